"""The ``serve`` command: the HTTP API and web view (optional extra ``web``; spec/http.md)."""

from __future__ import annotations

import click

from .options import json_option


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (anything but loopback needs --token-file).")
    @click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free port; the URL is printed).")
    @click.option("--allow-actions", "allow_actions", is_flag=True, help="Allow cancel, promote, unpromote and retain (POST, token and CSRF token required).")
    @click.option("--token-file", "token_file", type=click.Path(dir_okay=False), help="Private file of LABEL:TOKEN lines; every request then needs a token.")
    @json_option
    @click.pass_obj
    def serve(obj, host, port, allow_actions, token_file, as_json):
        """Serve the registry over HTTP: a JSON API and a live web view (read-only by default)."""
        from ..web.serve import main_ready, serve as run

        return run(obj.registry, host=host, port=port, allow_actions=allow_actions, token_file=token_file, ready=main_ready)
