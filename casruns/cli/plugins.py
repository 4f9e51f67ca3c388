"""``casruns plugins``: what is loaded, from where, implementing which hooks."""

from __future__ import annotations

import click

from . import render
from .options import json_option


def register(cli: click.Group) -> None:
    @cli.command()
    @json_option
    @click.pass_obj
    def plugins(obj, as_json):
        """List loaded plugins, their source, the hooks and providers each implements."""
        infos = obj.registry.plugins.info()
        render.emit(as_json, {"schema": "casruns/plugins/v1", "plugins": [i.to_json() for i in infos]}, lambda doc: _lines(infos))


def _lines(infos):
    for i in infos:
        yield f"{i.name}  ({i.source}, module {i.module})"
        if i.providers:
            yield f"  providers: {', '.join(i.providers)}"
        yield f"  hooks: {', '.join(i.hooks)}"
