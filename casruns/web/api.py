"""The JSON API under ``/api/v1/`` (spec/http.md): the CLI's JSON, over HTTP."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .app import WebContext


def routes(ctx: "WebContext") -> list:
    reg = ctx.registry

    async def healthz(request: Request) -> JSONResponse:
        ok = await run_in_threadpool(reg.check_format)
        return JSONResponse({"schema": "casruns/health/v1", "ok": bool(ok)}, status_code=200 if ok else 503)

    async def run(request: Request) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(reg.get, request.path_params["run_id"]))

    return [
        Route("/healthz", healthz),
        Route("/api/v1/runs/{run_id}", run),
    ]
