"""The JSON API under ``/api/v1/`` (spec/http.md): the CLI's JSON, over HTTP.

Every route calls the facade (``Registry``) in a worker thread and answers with the document the
CLI prints for the same question. Long answers stream (``Stream``): a log, an artifact, an NDJSON
list, the event stream. A stream listens for the client's disconnect and is cancelled at once; a
blocking generator it reads is only ever advanced one short step per worker-thread call and is
closed when the stream ends, so a client that goes away holds no thread and no file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import mimetypes
import os
import re
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from ..errors import Busy, CasrunsError, Forbidden, InvalidInput, UsageError
from ..ids import validate_run_id
from .hub import REPLAY_BATCH, Hub, dump
from .index import matcher

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .app import WebContext

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
LOG_POLL = 0.2  # seconds between looks at a followed live log (no thread is held meanwhile)
KEEPALIVE = 15.0  # seconds of silence before an SSE comment line
RETRY_MS = 3000  # the reconnection delay an EventSource is told to use
MAX_BODY = 64 * 1024
ARTIFACT_CSP = "sandbox; default-src 'none'"
INLINE_SAFE = {"text/plain", "text/csv", "application/json", "text/markdown", "text/x-log"}
NDJSON = "application/x-ndjson"
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# concurrent SSE clients; the next one is 503 busy (each may hold a replay batch in memory)
MAX_STREAMS = int(os.environ.get("CASRUNS_SERVE_MAX_STREAMS", "") or 512)
MAX_PAGE_TOKEN = 1024  # a page token this server gives is ~80 characters
HUGE = 1 << 62  # what a byte position of more digits than a 64-bit number holds is read as


def _pos(digits: str) -> int:
    """A Range byte position: beyond any size when it has too many digits (int() of
    thousands of digits raises)."""
    return int(digits) if len(digits) <= 18 else HUGE


# -- responses -----------------------------------------------------------------------------
class Json(Response):
    """A JSON document as the CLI writes it (compact, UTF-8, keys in their order)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return dump(content).encode("utf-8")


class Stream:
    """A streamed response that stops as soon as the client disconnects.

    ``body`` is an async iterator of bytes. An exception it raises after the response started
    (an integrity error in the middle of an artifact) is re-raised, so the server aborts the
    connection instead of ending the body as if it were complete.
    """

    def __init__(self, body: AsyncIterator[bytes], *, status_code: int = 200, headers: dict[str, str] | None = None, media_type: str) -> None:
        self.body, self.status_code = body, status_code
        self.headers = {"content-type": media_type, **(headers or {})}

    async def __call__(self, scope, receive, send) -> None:
        failure: BaseException | None = None
        raw = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in self.headers.items()]
        async with anyio.create_task_group() as tg:

            async def listen() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(listen)
            try:
                async with contextlib.aclosing(self.body) as body:
                    await send({"type": "http.response.start", "status": self.status_code, "headers": raw})
                    async for chunk in body:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client is gone (ASGI 2.4 servers raise on send)
                pass
            except Exception as e:  # noqa: BLE001 - re-raised below, outside the task group
                failure = e
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure


async def in_thread(fn, *args, **kw):
    return await run_in_threadpool(fn, *args, **kw)


async def thread_chunks(gen: Iterator[bytes], first: bytes | None = None) -> AsyncIterator[bytes]:
    """A blocking generator's items, one worker-thread call each; closed in a thread at the end
    (also when the stream is cancelled), so its files and watches are released."""
    try:
        if first:
            yield first
        while (chunk := await anyio.to_thread.run_sync(next, gen, None)) is not None:
            if chunk:
                yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(gen.close)


async def primed(gen: Iterator[bytes]) -> bytes | None:
    """The generator's first item, read before the response starts: a bad offset, a missing
    blob or run becomes an HTTP error instead of a broken stream."""
    try:
        return await anyio.to_thread.run_sync(next, gen, None)
    except BaseException:
        await anyio.to_thread.run_sync(gen.close)
        raise


# -- parameters ----------------------------------------------------------------------------
def _multi(request: Request, name: str) -> list[str]:
    out: list[str] = []
    for v in request.query_params.getlist(name):
        out.extend(p for p in v.split(",") if p) if name in ("status", "type", "run") else out.append(v)
    return out


def _bool(value: str | None, name: str) -> bool | None:
    if value is None or value == "":
        return None
    v = value.lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise InvalidInput(f"{name} must be true or false, not {value[:40]!r}")


def _int(value: str | None, name: str, default: int, lo: int, hi: int | None = None) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer, not {value[:40]!r}") from None
    if n < lo or (hi is not None and n > hi):
        raise InvalidInput(f"{name} must be between {lo} and {hi}" if hi is not None else f"{name} must be {lo} or more")
    return n


def encode_page(record: dict) -> str:
    key = json.dumps([record.get("created_at") or "", record["run_id"]], separators=(",", ":"))
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_page(token: str) -> tuple[str, str]:
    try:
        if len(token) > MAX_PAGE_TOKEN:
            raise ValueError
        created, rid = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(created, str) or not isinstance(rid, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise InvalidInput("page is not a token this server gave (use the list's next)") from None
    return created, rid


def _labels(items: list[str]) -> dict[str, str]:
    from ..registry import parse_labels

    return parse_labels(items)


def _disposition(kind: str, path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "artifact"
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


def _ranged(chunks: Iterator[bytes], start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start..end`` (inclusive) of a verified stream. The whole blob is still read, and
    the last piece is held back until it is verified: nothing unverified leaves the server."""
    pos, held = 0, None
    for chunk in chunks:
        lo, hi = max(start - pos, 0), min(end + 1 - pos, len(chunk))
        pos += len(chunk)
        if lo < hi:
            if held is not None:
                yield held
            held = chunk[lo:hi]
    if held is not None:
        yield held


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _sse(cursor: str | None, kind: str, data: str) -> bytes:
    head = f"id: {cursor}\n" if cursor else ""
    return f"{head}event: {kind}\ndata: {data}\n\n".encode("utf-8", "surrogateescape")


# -- routes --------------------------------------------------------------------------------
def routes(ctx: "WebContext") -> list:
    reg = ctx.registry
    hub = getattr(ctx, "hub", None)
    if hub is None:
        hub = ctx.hub = Hub(reg)
        ctx.startup.append(hub.start)
        ctx.shutdown.append(hub.stop)

    async def healthz(request: Request) -> Response:
        ok = await in_thread(reg.check_format)
        return Json({"schema": "casruns/health/v1", "ok": bool(ok)}, status_code=200 if ok else 503)

    async def runs(request: Request) -> Response:
        qp = request.query_params
        limit = _int(qp.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        page = qp.get("page")
        before = decode_page(page) if page else None
        labels = _labels(_multi(request, "label"))
        promoted = _bool(qp.get("promoted"), "promoted")
        errors: list = []

        def read():
            cursor = reg.events_cursor() if reg.check_format() else "0" * 16  # before reading: misses nothing
            records = reg.list(
                statuses=_multi(request, "status"), labels=labels, since=qp.get("since") or None, limit=limit + 1,
                promoted=promoted, errors=errors, before=before, where=matcher(qp.get("provider"), qp.get("q")),
            )
            return cursor, records

        cursor, records = await in_thread(read)
        nxt = encode_page(records[limit - 1]) if len(records) > limit else None
        records = records[:limit]
        if qp.get("format") == "ndjson" or NDJSON in request.headers.get("accept", ""):
            headers = {"x-casruns-cursor": cursor, **({"x-casruns-next": nxt} if nxt else {})}

            async def lines() -> AsyncIterator[bytes]:
                for r in records:
                    yield (dump(r) + "\n").encode("utf-8", "surrogateescape")
                for e in errors:
                    err = {"schema": "casruns/error/v1", "error": {"code": e["code"], "message": e["message"], "exit_code": 6, "details": {"run_id": e["run_id"]}}}
                    yield (dump(err) + "\n").encode("utf-8", "surrogateescape")

            return Stream(lines(), headers=headers, media_type=NDJSON)
        doc = {"schema": "casruns/list/v1", "cursor": cursor, "runs": records, "next": nxt}
        if errors:
            doc["errors"] = errors
        return Json(doc)

    async def run(request: Request) -> Response:
        return Json(await in_thread(reg.get, request.path_params["run_id"]))

    async def chain(request: Request) -> Response:
        rid = request.path_params["run_id"]

        def read():
            return reg.events_cursor() if reg.check_format() else "0" * 16, reg.chain(rid)

        cursor, records = await in_thread(read)
        return Json({"schema": "casruns/list/v1", "cursor": cursor, "runs": records})

    async def artifacts(request: Request) -> Response:
        rid = request.path_params["run_id"]

        def read():
            tree = reg.tree(rid)
            m = reg.manifest(rid)
            return {
                "schema": "casruns/artifacts/v1", "run_id": rid, "tree": (m.get("artifacts") or {}).get("tree"),
                "files": tree.files, "bytes": tree.total_size, "entries": [e.to_json() for e in tree.entries], "skipped": tree.skipped,
            }

        return Json(await in_thread(read))

    async def artifact(request: Request) -> Response:
        rid = validate_run_id(request.path_params["run_id"])
        path = request.path_params["path"]

        def lookup():
            from ..errors import ArtifactNotFound

            entry = reg.tree(rid).get(path)  # safe_relpath: refuses '..', absolute paths, NUL
            if entry is None or entry.type != "file":
                raise ArtifactNotFound(f"run {rid} has no artifact file {path!r}", run_id=rid, path=path)
            return entry

        entry = await in_thread(lookup)
        size, etag = entry.size, f'"{entry.blake3}"'
        ctype = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
        inline = _bool(request.query_params.get("inline"), "inline") and ctype in INLINE_SAFE
        headers = {
            "etag": etag, "accept-ranges": "bytes", "content-security-policy": ARTIFACT_CSP,
            "x-content-type-options": "nosniff",
            "content-disposition": _disposition("inline" if inline else "attachment", entry.path),
        }
        if ctype.startswith("text/") or ctype == "application/json":
            ctype += "; charset=utf-8" if inline else ""
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        start, end, status = 0, size - 1, 200
        rng = request.headers.get("range")
        if rng and (request.headers.get("if-range") in (None, etag)):
            m = RANGE_RE.fullmatch(rng.strip())
            if m and (m.group(1) or m.group(2)) and not (m.group(1) and m.group(2) and _pos(m.group(2)) < _pos(m.group(1))):
                if m.group(1):
                    start = _pos(m.group(1))
                    end = min(_pos(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start, end = max(size - _pos(m.group(2)), 0), size - 1
                if start >= size or start > end:
                    return Json(InvalidInput(f"range {rng[:60]!r} is outside the artifact ({size} bytes)").to_json(),
                                status_code=416, headers={"content-range": f"bytes */{size}", **headers})
                status = 206
                headers["content-range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        headers["content-length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type=ctype)
        gen = await in_thread(reg.cat, rid, entry.path)
        if status == 206:
            gen = _ranged(gen, start, end)
        first = await primed(gen)
        return Stream(thread_chunks(gen, first), status_code=status, headers=headers, media_type=ctype)

    async def logs(request: Request) -> Response:
        rid, stream = request.path_params["run_id"], request.path_params["stream"]
        offset = _int(request.query_params.get("offset"), "offset", 0, 0)
        follow = bool(_bool(request.query_params.get("follow"), "follow"))
        rec = await in_thread(reg.get, rid)
        gen = reg.log_chunks(rid, stream, follow=False, offset=offset)
        first = await primed(gen)

        async def body() -> AsyncIterator[bytes]:
            nonlocal gen, first, rec
            pos = offset
            while True:
                async with contextlib.aclosing(thread_chunks(gen, first)) as chunks:  # closed now, also on a disconnect
                    async for chunk in chunks:
                        pos += len(chunk)
                        yield chunk
                if not follow or rec["terminal"] or hub.stopping.is_set():
                    return
                await asyncio.sleep(LOG_POLL)
                rec = await in_thread(reg.get, rid)  # before the pass: a terminal status means it is the last
                gen, first = reg.log_chunks(rid, stream, follow=False, offset=pos), None

        headers = {"x-casruns-offset": str(offset), "x-casruns-status": rec["status"], "content-security-policy": ARTIFACT_CSP}
        return Stream(body(), headers=headers, media_type="text/plain; charset=utf-8")

    async def events(request: Request) -> Response:
        qp = request.query_params
        since = request.headers.get("last-event-id") or qp.get("since") or None
        filters = {"run_ids": _multi(request, "run"), "labels": _labels(_multi(request, "label")), "types": _multi(request, "type")}
        if len(hub.subscribers) >= MAX_STREAMS:
            from .app import error_response

            busy = error_response(Busy(f"this server already streams events to {MAX_STREAMS} clients; retry later"))
            busy.status_code = 503
            busy.headers["retry-after"] = "5"
            return busy
        sub = hub.subscribe(**filters)  # before the replay reads the journal: no gap between them
        replay = reg.events(since=since, from_now=not since, follow=False, **filters)

        def batch() -> list[dict]:
            out = []
            for event in replay:
                out.append(event)
                if len(out) >= REPLAY_BATCH:
                    break
            return out

        try:
            first = await anyio.to_thread.run_sync(batch)  # an expired or bad cursor: 410/400 now
        except BaseException:
            hub.unsubscribe(sub)
            await anyio.to_thread.run_sync(replay.close)
            raise

        async def body() -> AsyncIterator[bytes]:
            nonlocal replay
            last = since
            yield f"retry: {RETRY_MS}\n\n".encode()
            try:
                items = first
                while True:  # the replay, then again from where it ended if live events overflowed meanwhile
                    while items:
                        for event in items:
                            last = event["cursor"]
                            yield _sse(last, event.get("type") or "event", dump(event))
                        items = await anyio.to_thread.run_sync(batch)
                    if not sub.overflowed:
                        break
                    sub.overflowed = False
                    sub.items.clear()
                    await anyio.to_thread.run_sync(replay.close)
                    replay = reg.events(since=last, follow=False, **filters) if last else reg.events(from_now=True, follow=False, **filters)
                    items = await anyio.to_thread.run_sync(batch)
                while not sub.closed:
                    try:
                        await asyncio.wait_for(sub.ready.wait(), KEEPALIVE)
                    except asyncio.TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if sub.overflowed:
                        err = Busy("this stream fell behind (a client slower than the events, or the server's journal follower restarted); "
                                   "reconnect with Last-Event-ID to resume from the journal", cursor=last)
                        yield _sse(None, "error", dump(err.to_json()))
                        return
                    for cursor, kind, data in sub.take():
                        if last is None or cursor > last:
                            last = cursor
                            yield _sse(cursor, kind, data)
            except CasrunsError as e:  # the cursor expired mid-replay, a damaged journal line
                yield _sse(None, "error", dump(e.to_json()))
            finally:
                hub.unsubscribe(sub)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(replay.close)

        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        return Stream(body(), headers=headers, media_type="text/event-stream; charset=utf-8")

    # -- actions ---------------------------------------------------------------------------
    async def action_body(request: Request) -> tuple[str, dict]:
        """Who acts, and the JSON body: POST only, with a token; a cookie session also needs
        its CSRF header (a bearer token is never sent by a browser on its own)."""
        if request.method != "POST":
            err = UsageError(f"{request.url.path} changes the registry: use POST")
            return "", {"_response": Json(err.to_json(), status_code=405, headers={"allow": "POST"})}
        who = ctx.require_action(request)
        if ctx.auth.bearer(request.headers.get("authorization")) is None:
            from .app import _cookie
            from .auth import COOKIE

            if not ctx.auth.csrf_ok(_cookie(request.headers.get("cookie"), COOKIE), request.headers.get("x-csrf-token")):
                raise Forbidden("a request authenticated by its session cookie needs its X-CSRF-Token header")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise InvalidInput(f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise InvalidInput("the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise InvalidInput("the request body must be a JSON object")
        return who, body

    def _text(body: dict, key: str) -> str | None:
        v = body.get(key)
        if v is not None and not isinstance(v, str | int | float):
            raise InvalidInput(f"{key} must be a string")
        return None if v is None else str(v)

    def action(kind: str):
        async def endpoint(request: Request) -> Response:
            who, body = await action_body(request)
            if "_response" in body:
                return body["_response"]
            rid = request.path_params["run_id"]
            if kind == "cancel":
                r, outcome = await in_thread(reg.cancel, rid, reason=_text(body, "reason"))
                return Json({"schema": "casruns/cancel/v1", "run_id": rid, "outcome": outcome, "run": r})
            if kind == "retain":
                return Json(await in_thread(reg.retain, rid, for_=_text(body, "for"), until=_text(body, "until")))
            reason = _text(body, "reason")
            if not reason or not reason.strip():
                raise InvalidInput("reason is required and must not be empty")
            fn = reg.promote if kind == "promote" else reg.unpromote
            r, outcome = await in_thread(fn, rid, reason=reason, by=who)
            return Json({"schema": "casruns/promotion/v1", "run_id": rid, "outcome": outcome, "run": r})

        return endpoint

    async def not_found(request: Request) -> Response:
        allowed = sorted({m for r in table[:-1] if r.matches(request.scope)[0] == Match.PARTIAL for m in (r.methods or ())})
        if allowed:  # the path exists, not for this method
            err = UsageError(f"{request.method} is not allowed on {request.url.path[:200]!r}; use {', '.join(allowed)}")
            return Json(err.to_json(), status_code=405, headers={"allow": ", ".join(allowed)})
        err = UsageError(f"no API endpoint {request.url.path[:200]!r} (spec/http.md lists them)")
        return Json(err.to_json(), status_code=404)

    table = [
        Route("/healthz", healthz),
        Route("/api/v1/runs", runs),
        Route("/api/v1/events", events),
        Route("/api/v1/runs/{run_id}", run),
        Route("/api/v1/runs/{run_id}/chain", chain),
        Route("/api/v1/runs/{run_id}/artifacts", artifacts),
        Route("/api/v1/runs/{run_id}/artifacts/{path:path}", artifact, methods=["GET", "HEAD"]),
        Route("/api/v1/runs/{run_id}/logs/{stream}", logs),
        *(Route(f"/api/v1/runs/{{run_id}}/{kind}", action(kind), methods=["GET", "POST"]) for kind in ("cancel", "promote", "unpromote", "retain")),
        Route("/api/{rest:path}", not_found, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    ]
    return table
