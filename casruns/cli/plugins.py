"""``casruns plugins``: what is loaded, from where, implementing which hooks."""

from __future__ import annotations

import click

from . import render
from .app import JSON_OPT


def register(cli: click.Group) -> None:
    @cli.command()
    @JSON_OPT
    @click.pass_obj
    def plugins(obj, as_json):
        """List loaded plugins, their source, the hooks and providers each implements."""
        infos = obj.registry.plugins.info()
        if as_json:
            render.emit_json({"schema": "casruns/plugins/v1", "plugins": [i.to_json() for i in infos]})
            return
        for i in infos:
            click.echo(f"{i.name}  ({i.source}, module {i.module})")
            if i.providers:
                click.echo(f"  providers: {', '.join(i.providers)}")
            click.echo(f"  hooks: {', '.join(i.hooks)}")
