"""The ASGI application: routes of the API and the pages, one guard for auth and headers.

``build_app(registry, tokens=..., allow_actions=...)`` returns the app; ``casruns serve``
(serve.py) runs it under uvicorn. Every response gets the security headers of spec/http.md;
every request but ``/healthz``, ``/login`` and ``/static/*`` needs a token when the server
has tokens. Errors are ``casruns/error/v1`` with the HTTP status of their code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from ..errors import CasrunsError, Forbidden, Unauthorized, from_unexpected
from .auth import COOKIE, Auth
from .serve import is_loopback

HERE = os.path.dirname(os.path.abspath(__file__))
OPEN_PATHS = ("/healthz", "/login", "/static/")

# spec/http.md, "Errors": the HTTP status of each error code (anything else: 500)
HTTP_STATUS = {
    "usage": 400, "invalid_input": 400, "invalid_run_id": 400, "invalid_address": 400, "unsafe_path": 400,
    "unknown_provider": 400, "backend_missing": 400, "unauthorized": 401, "forbidden": 403,
    "run_not_found": 404, "blob_not_found": 404, "artifact_not_found": 404,
    "conflict": 409, "run_id_conflict": 409, "invalid_transition": 409, "busy": 409,
    "cursor_expired": 410, "plugin_error": 422, "no_space": 507, "archive_unavailable": 503,
}

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
PAGE_CSP = b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"


class WebContext:
    """What every route needs: the registry, who may do what, and the optional parts."""

    def __init__(self, registry, *, tokens: dict[str, str] | None = None, allow_actions: bool = False) -> None:
        self.registry = registry
        self.auth = Auth(tokens)
        self.allow_actions = allow_actions
        self.startup: list[Callable[[], Awaitable[None] | None]] = []
        self.shutdown: list[Callable[[], Awaitable[None] | None]] = []

    def who(self, request: Request) -> str | None:
        return getattr(request.state, "who", None)

    def require_action(self, request: Request) -> str:
        """The label an action is recorded with; Forbidden unless actions are allowed."""
        if not self.allow_actions:
            raise Forbidden("this server does not allow actions (start it with --allow-actions and --token-file)")
        who = self.who(request)
        if who is None:
            raise Unauthorized("actions need a token")
        return who


def error_response(err: CasrunsError) -> JSONResponse:
    return JSONResponse(err.to_json(), status_code=HTTP_STATUS.get(err.code, 500))


def build_app(registry, *, tokens: dict[str, str] | None = None, allow_actions: bool = False) -> "Guard":
    from contextlib import asynccontextmanager

    from . import api, pages

    ctx = WebContext(registry, tokens=tokens, allow_actions=allow_actions)

    @asynccontextmanager
    async def lifespan(app):
        for fn in ctx.startup:
            r = fn()
            if r is not None:
                await r
        try:
            yield
        finally:
            for fn in ctx.shutdown:
                r = fn()
                if r is not None:
                    await r

    async def on_error(request: Request, exc: Exception) -> Response:
        err = exc if isinstance(exc, CasrunsError) else from_unexpected(exc)
        if not request.url.path.startswith("/api/") and request.method in ("GET", "POST") and hasattr(pages, "error_page"):
            return pages.error_page(ctx, request, err, HTTP_STATUS.get(err.code, 500))
        return error_response(err)

    routes = [*api.routes(ctx), *pages.routes(ctx), Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static")]
    app = Starlette(routes=routes, exception_handlers={CasrunsError: on_error, Exception: on_error}, lifespan=lifespan)
    app.state.ctx = ctx
    return Guard(app, ctx)


class Guard:
    """Pure ASGI (so streams stay streams): authentication, then the security headers."""

    def __init__(self, app: Starlette, ctx: WebContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = self.ctx.auth
        who = auth.bearer(headers.get("authorization"))
        if who is None:
            who = auth.session_label(_cookie(headers.get("cookie"), COOKIE))
        scope.setdefault("state", {})["who"] = who
        if not auth.required and not _loopback_host(headers.get("host")):
            # an open server is for this machine only: a page of another site whose name is
            # rebound to 127.0.0.1 (DNS rebinding) sends its own name as Host and is refused
            err = Forbidden("this server, open without a token, answers only a loopback Host (localhost, 127.0.0.1, [::1])")
            response = error_response(err)
            for k, v in SECURITY_HEADERS:
                response.headers.setdefault(k.decode(), v.decode())
            response.headers.setdefault("content-security-policy", PAGE_CSP.decode())
            return await response(scope, receive, send)
        if auth.required and who is None and not path.startswith(OPEN_PATHS):
            return await self._unauthorized(scope, receive, send, path)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                if b"content-security-policy" not in have:
                    extra.append((b"content-security-policy", PAGE_CSP))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _unauthorized(self, scope, receive, send, path: str) -> None:
        err = Unauthorized("this server needs a token: an Authorization: Bearer header for the API, or log in at /login")
        if path.startswith("/api/"):
            response: Response = error_response(err)
            response.headers["www-authenticate"] = 'Bearer realm="casruns"'
        else:
            from . import pages

            response = pages.login_page(self.ctx, Request(scope, receive), status_code=401) if hasattr(pages, "login_page") else error_response(err)
        for k, v in SECURITY_HEADERS:
            response.headers.setdefault(k.decode(), v.decode())
        response.headers.setdefault("content-security-policy", PAGE_CSP.decode())
        await response(scope, receive, send)


def _loopback_host(host: str | None) -> bool:
    """Whether a Host header names this machine: localhost or a loopback address, any port."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return False
    else:
        name, sep, port = host.rpartition(":")
        if not sep:
            name = host
        elif not re.fullmatch(r"\d{1,5}", port):
            return False
    return is_loopback(name.removesuffix("."))


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None
