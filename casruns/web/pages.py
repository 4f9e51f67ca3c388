"""The HTML pages (spec/http-pages.md): rendered on the server, usable without JavaScript.

Every page is a Jinja2 template with autoescape on; nothing a run holds (labels, log lines,
artifact names and contents, plugin metadata) is ever marked safe. Scripts come only from
``/static/app.js`` (the CSP allows no inline script); the server hands it what it needs in
``data-*`` attributes, and it writes text with ``textContent`` only. The live parts (the runs
table, a run's status, timeline and log tail) read the JSON API (``/api/v1/events``,
``/api/v1/runs/{id}/logs/{stream}``); everything else is read here, from the registry.
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ArtifactNotFound, CasrunsError, Forbidden, InvalidInput, Unauthorized
from ..manifest import STATUSES
from .index import matcher
from .auth import COOKIE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .app import WebContext

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_SIZE = 100  # rows of the runs table per page
LOG_WINDOW = 64 << 10  # bytes of a log the run page shows (the end of it)
VIEW_MAX = 1 << 20  # an artifact bigger than this is not shown inline
FORM_MAX = 64 << 10  # bytes of a form body read
STREAMS = ("stdout", "stderr", "transcript")
ACTIONS = ("cancel", "promote", "unpromote", "retain")
# raw logs and artifacts are shown as text in a sandbox: never a document of the app's origin
RAW_HEADERS = {"content-security-policy": "sandbox; default-src 'none'", "x-content-type-options": "nosniff"}

env = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")), autoescape=True, trim_blocks=True, lstrip_blocks=True)


def _json(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _qs(request: Request, **change) -> str:
    """The current query string with ``change`` applied (None removes a key)."""
    items = [(k, v) for k, v in request.query_params.multi_items() if k not in change]
    items += [(k, v) for k, v in change.items() if v is not None]
    return "?" + urlencode(items) if items else "?"


env.filters["json"] = _json
env.globals["quote"] = lambda p: quote(p, safe="/")


def safe_link(url) -> str | None:
    """``url`` when it is an absolute http(s) URL (then it may be a link), else None."""
    if not isinstance(url, str) or any(c in url for c in "\r\n\t\\ ") or any(ord(c) < 32 for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme.lower() in ("http", "https") and parts.netloc else None


def safe_next(target: str | None) -> str:
    """A same-site path to go back to after login; "/" for anything else."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 32 for c in target) or urlsplit(target).netloc:
        return "/"
    return target


def render(ctx: "WebContext", request: Request, name: str, status_code: int = 200, **data) -> HTMLResponse:
    cookie = request.cookies.get(COOKIE)
    site = {
        "who": ctx.who(request),
        "auth_required": ctx.auth.required,
        "allow_actions": ctx.allow_actions,
        "csrf": ctx.auth.csrf_token(cookie) if cookie else "",
        "logged_in": bool(ctx.auth.session_label(cookie)),
    }
    return HTMLResponse(env.get_template(name).render(site=site, request=request, **data), status_code=status_code)


def login_page(ctx: "WebContext", request: Request, status_code: int = 401, message: str | None = None) -> HTMLResponse:
    path = request.url.path
    nxt = request.query_params.get("next") if path == "/login" else path + (f"?{request.url.query}" if request.url.query else "")
    return render(ctx, request, "login.html", status_code=status_code, next=safe_next(nxt), message=message)


def error_page(ctx: "WebContext", request: Request, err: CasrunsError, status: int) -> HTMLResponse:
    if status == 401:
        return login_page(ctx, request, message=err.message)
    return render(ctx, request, "error.html", status_code=status, err=err, status=status)


# -- what the pages show ------------------------------------------------------------------------


def runs_view(reg, params, index=None) -> dict:
    """The runs table: filters, counts per status (before the status filter), one page of rows.

    With the server's index (web/index.py) ready, which runs match and how many of each status
    there are come from memory; the rows shown are read fresh (and a lost run is reaped)."""
    statuses = [s for s in params.getlist("status") if s]
    for s in statuses:
        if s not in STATUSES:
            raise InvalidInput(f"unknown status {s!r}; one of: {', '.join(STATUSES)}")
    labels: dict[str, str] = {}
    for item in params.getlist("label"):
        for part in item.split():
            k, sep, v = part.partition("=")
            if not sep or not k:
                raise InvalidInput(f"a label filter is KEY=VALUE, not {part!r}")
            labels[k] = v
    promoted = {"yes": True, "no": False}.get(params.get("promoted", ""))
    provider = params.get("provider", "").strip()
    text = params.get("q", "").strip()
    try:
        page = max(1, int(params.get("page", "1")))
    except ValueError:
        raise InvalidInput("page must be a number") from None
    cursor = reg.events_cursor()  # before the runs are read: following from it misses nothing
    errors: list = []
    runs = index.snapshot(cursor) if index is not None else None
    from_index = runs is not None
    if runs is None:
        runs = reg.list(labels=labels or None, promoted=promoted, errors=errors)
    else:
        if labels:
            runs = [r for r in runs if all(r["labels"].get(k) == v for k, v in labels.items())]
        if promoted is not None:
            runs = [r for r in runs if bool(r["retention"]["promoted"]) == promoted]
    where = matcher(provider, text)
    if where is not None:
        runs = [r for r in runs if where(r)]
    counts = {s: 0 for s in STATUSES}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if statuses:
        runs = [r for r in runs if r["status"] in statuses]
    total = len(runs)
    pages = max(1, -(-total // PAGE_SIZE))
    rows = runs[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    if from_index:
        rows = _fresh(reg, rows)
    filtered = bool(statuses or labels or promoted is not None or provider or text)
    return {
        "rows": rows, "counts": counts, "total": total, "page": page, "pages": pages, "cursor": cursor, "errors": errors,
        "filters": {"status": statuses, "label": " ".join(f"{k}={v}" for k, v in labels.items()), "promoted": params.get("promoted", ""),
                    "provider": provider, "q": params.get("q", "")},
        "live_insert": page == 1 and not filtered, "statuses": STATUSES,
    }


def _fresh(reg, rows: list[dict]) -> list[dict]:
    """The shown rows as their runs stand now (the index holds only what it filters on)."""
    out = []
    for r in rows:
        try:
            out.append(reg.get(r["run_id"]))
        except CasrunsError:
            continue  # removed since the index saw it (or unreadable now: list reports those)
    return out


def timeline(record: dict) -> list[dict]:
    """What happened to a run, oldest first, from its record (not the journal: reading the
    journal for one run is a scan of the whole journal)."""
    items = [{"at": record["created_at"], "what": "created", "detail": f"attempt {record['attempt']}"}]
    if record.get("started_at"):
        items.append({"at": record["started_at"], "what": "started", "detail": ""})
    cancel = record.get("cancel") or {}
    if cancel.get("requested_at"):
        items.append({"at": cancel["requested_at"], "what": "cancel requested", "detail": cancel.get("reason") or ""})
    for h in record["retention"]["history"]:
        detail = " ".join(x for x in (h.get("reason") and f"reason: {h['reason']}", h.get("by") and f"by {h['by']}",
                                      h.get("metadata") and f"metadata: {_json(h['metadata'])}") if x)
        items.append({"at": h.get("at") or "", "what": h.get("action") or "retention", "detail": detail})
    if record.get("finished_at"):
        items.append({"at": record["finished_at"], "what": record["status"] if record["terminal"] else "finished", "detail": ""})
    elif not record["terminal"]:
        items.append({"at": record.get("updated_at") or "", "what": record["status"], "detail": "now"})
    return sorted(items, key=lambda i: i["at"] or "")


def log_window(reg, record: dict, stream: str) -> dict:
    """The last LOG_WINDOW bytes of a log: {"text", "start", "end"} (byte offsets)."""
    ref = (record.get("logs") or {}).get(stream)
    if record["terminal"] and ref:
        size = ref["size"]
        start = max(0, size - LOG_WINDOW)
        data = b"".join(reg.log_chunks(record["run_id"], stream, offset=start))
    else:  # live: the spool's end is not known beforehand; keep a rolling window
        buf = bytearray()
        start = 0
        for chunk in reg.log_chunks(record["run_id"], stream, offset=0):
            buf += chunk
            if len(buf) > 2 * LOG_WINDOW:
                cut = len(buf) - LOG_WINDOW
                del buf[:cut]
                start += cut
        if len(buf) > LOG_WINDOW:
            cut = len(buf) - LOG_WINDOW
            del buf[:cut]
            start += cut
        data = bytes(buf)
    if start:  # do not show a character cut in half
        skip = 0
        while skip < min(3, len(data)) and (data[skip] & 0xC0) == 0x80:
            skip += 1
        data, start = data[skip:], start + skip
    return {"text": data.decode("utf-8", errors="replace"), "start": start, "end": start + len(data)}


def run_view(reg, run_id: str, stream: str) -> dict:
    if stream not in STREAMS:
        raise InvalidInput(f"unknown stream {stream!r}; one of: {', '.join(STREAMS)}")
    cursor = reg.events_cursor()
    record = reg.get(run_id)
    try:
        chain = reg.chain(run_id)
    except CasrunsError:
        chain = [record]
    tree = reg.tree(run_id) if record.get("artifacts") else None
    preview = record.get("preview") or {}
    return {
        "r": record, "cursor": cursor, "chain": chain, "stream": stream, "streams": STREAMS, "log": log_window(reg, record, stream),
        "timeline": timeline(record), "entries": sorted(tree.entries, key=lambda e: e.path) if tree else [],
        "skipped": tree.skipped if tree else [], "preview_link": safe_link(preview.get("url")), "view_max": VIEW_MAX,
    }


def artifact_view(reg, run_id: str, path: str) -> dict:
    record = reg.get(run_id)
    entry = reg.tree(run_id).get(path)
    if entry is None:
        raise ArtifactNotFound(f"run {run_id} has no artifact {path!r}", run_id=run_id, path=path)
    text = None
    why = None
    if entry.type != "file":
        why = f"a symbolic link to {entry.target}"
    elif entry.size > VIEW_MAX:
        why = f"{entry.size} bytes: larger than the {VIEW_MAX} bytes shown inline"
    else:
        data = b"".join(reg.cat(run_id, path))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            why = "not UTF-8 text"
        if text is not None and "\x00" in text:
            text, why = None, "binary (it holds NUL bytes)"
    return {"r": record, "entry": entry, "text": text, "why": why}


def read_form(body: bytes) -> dict[str, str]:
    if len(body) > FORM_MAX:
        raise InvalidInput(f"a form is at most {FORM_MAX} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the form is not URL-encoded UTF-8") from None
    return {k: v[-1] for k, v in fields.items()}


def do_action(reg, action: str, run_id: str, form: dict[str, str], who: str) -> None:
    reason = form.get("reason", "").strip()
    if action == "cancel":  # cancel records no actor (as the CLI); the reason says who asked
        reg.cancel(run_id, reason=reason or f"cancelled by {who}")
    elif action in ("promote", "unpromote"):
        if not reason:
            raise InvalidInput(f"{action} needs a reason")
        getattr(reg, action)(run_id, reason=reason, by=who)
    else:
        for_, until = form.get("for", "").strip(), form.get("until", "").strip()
        if bool(for_) == bool(until):
            raise InvalidInput("retain takes exactly one of: keep for (a duration), keep until (a time)")
        reg.retain(run_id, for_=for_ or None, until=until or None)


# -- routes ---------------------------------------------------------------------------------------


def routes(ctx: "WebContext") -> list:
    reg = ctx.registry

    async def runs_page(request: Request) -> Response:
        hub = getattr(ctx, "hub", None)
        data = await run_in_threadpool(runs_view, reg, request.query_params, hub.index if hub is not None else None)
        data["qs"] = lambda **change: _qs(request, **change)
        return render(ctx, request, "runs.html", **data)

    async def run_page(request: Request) -> Response:
        data = await run_in_threadpool(run_view, reg, request.path_params["run_id"], request.query_params.get("stream", "stdout"))
        return render(ctx, request, "run.html", **data)

    async def view_page(request: Request) -> Response:
        data = await run_in_threadpool(artifact_view, reg, request.path_params["run_id"], request.path_params["path"])
        return render(ctx, request, "view.html", **data)

    async def raw_log(request: Request) -> Response:
        run_id, stream = request.path_params["run_id"], request.path_params["stream"]
        if stream not in STREAMS:
            raise InvalidInput(f"unknown stream {stream!r}; one of: {', '.join(STREAMS)}")
        chunks = iter(reg.log_chunks(run_id, stream))
        first = await run_in_threadpool(next, chunks, b"")  # an unknown run fails here, before the response starts

        async def body():
            yield first
            while True:
                chunk = await run_in_threadpool(next, chunks, None)
                if chunk is None:
                    return
                yield chunk

        return StreamingResponse(body(), media_type="text/plain; charset=utf-8", headers=RAW_HEADERS)

    async def login_get(request: Request) -> Response:
        if not ctx.auth.required:
            return RedirectResponse("/", status_code=303)
        return login_page(ctx, request, status_code=200)

    async def login_post(request: Request) -> Response:
        form = read_form(await request.body())
        label = ctx.auth.label_for_token(form.get("token", "").strip())
        if not ctx.auth.required:
            return RedirectResponse("/", status_code=303)
        if label is None:
            request.scope["query_string"] = urlencode({"next": form.get("next", "/")}).encode()
            return login_page(ctx, Request(request.scope), status_code=401, message="that token is not valid")
        response = RedirectResponse(safe_next(form.get("next")), status_code=303)
        response.set_cookie(COOKIE, ctx.auth.new_session(label), httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    async def logout(request: Request) -> Response:
        ctx.auth.end_session(request.cookies.get(COOKIE))  # a copy of the cookie no longer works either
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def action(request: Request) -> Response:
        name, run_id = request.path_params["action"], request.path_params["run_id"]
        if name not in ACTIONS:
            raise InvalidInput(f"unknown action {name!r}; one of: {', '.join(ACTIONS)}")
        who = ctx.require_action(request)
        form = read_form(await request.body())
        cookie = request.cookies.get(COOKIE)
        if not ctx.auth.csrf_ok(cookie, form.get("csrf")):
            raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
        if ctx.auth.session_label(cookie) != who:
            raise Unauthorized("log in again: the session and the request disagree on who you are")
        await run_in_threadpool(do_action, reg, name, run_id, form, who)
        return RedirectResponse(f"/runs/{quote(run_id, safe='')}", status_code=303)

    return [
        Route("/", runs_page),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/view/{path:path}", view_page),
        Route("/runs/{run_id}/log/{stream}", raw_log),
        Route("/runs/{run_id}/{action}", action, methods=["POST"]),
        Route("/login", login_get, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
