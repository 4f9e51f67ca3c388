"""The click CLI: parse arguments, call ``casruns.Registry``, render, map errors to exit codes.

The group is built by :func:`build_cli`, not at import time, from one module per family of
commands (``runs``, ``evidence``, ``maintenance``, ``archive``, ``plugins``), each with a
``register(cli)``; their shared options are in ``options``, their output goes through
``render.emit``. Every command takes ``--json``; with it, success and errors are both JSON
on stdout (spec/cli.md).
"""

from __future__ import annotations

import sys

import click

from ..errors import CasrunsError, UsageError
from . import render


class Ctx:
    def __init__(self, root: str | None, plugins: tuple[str, ...] = ()) -> None:
        self.root = root
        self.plugins = plugins
        self._registry = None

    @property
    def registry(self):
        if self._registry is None:
            from ..registry import Registry

            self._registry = Registry(self.root, plugins=self.plugins)
        return self._registry


def build_cli() -> click.Group:
    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--root",
        type=click.Path(file_okay=False),
        help="Registry directory (default: $CASRUNS_HOME, else $XDG_DATA_HOME/casruns).",
    )
    @click.option("--plugin", "plugins", multiple=True, metavar="MODULE", help="Load a plugin module (repeatable).")
    @click.version_option(package_name="casruns")
    @click.pass_context
    def cli(ctx: click.Context, root: str | None, plugins: tuple[str, ...]) -> None:
        """casruns: a durable run registry for headless sandbox runs."""
        ctx.obj = Ctx(root, plugins)

    from . import archive, events, evidence, maintenance, runs, serve
    from . import plugins as plugin_commands  # not the group's --plugin values

    for family in (runs, events, evidence, maintenance, archive, plugin_commands, serve):
        family.register(cli)
    return cli


def run_cli(args: list[str]) -> int:
    as_json = "--json" in args
    cli = build_cli()
    try:
        result = cli.main(args=args, prog_name="casruns", standalone_mode=False)
    except CasrunsError as e:
        return render.error(e, as_json)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        sys.stderr.write("casruns: aborted\n")
        return 1
    except click.UsageError as e:
        # one line, like every other error (click's own format is four: usage, hint, blank, error)
        where = f" (see casruns {e.ctx.command_path.split(' ', 1)[1] + ' ' if e.ctx and ' ' in e.ctx.command_path else ''}--help)"
        return render.error(UsageError(" ".join(e.format_message().split()) + where), as_json)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - an unexpected failure is still one line
        # An unexpected failure still gets one line and a documented code, not a traceback.
        from ..errors import from_unexpected

        return render.error(from_unexpected(e), as_json)
    return result if isinstance(result, int) else 0
