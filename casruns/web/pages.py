"""The HTML pages (spec/http.md, "Pages"): rendered on the server, usable without JavaScript."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .app import WebContext


def routes(ctx: "WebContext") -> list:
    return []
