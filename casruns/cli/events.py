"""The ``events`` command: the registry's event journal, printed and optionally followed."""

from __future__ import annotations

import sys

import click

from .. import errors as E
from . import options, render
from .options import json_option


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--since", metavar="CURSOR", help="Start after the event (or list) that carried CURSOR.")
    @click.option("--from-start", "from_start", is_flag=True, help="Start at the oldest event kept (the default without --follow).")
    @click.option("--from-now", "from_now", is_flag=True, help="Start at the end: only new events (the default with --follow).")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they happen.")
    @click.option("--run", "run_ids", multiple=True, metavar="RUN_ID", help="Only this run's events (repeatable).")
    @options.label_option("Only events of runs with this label (repeatable; all must match).")
    @click.option("--type", "types", multiple=True, metavar="TYPE", help="Only events of this type, or status events into this status (repeatable).")
    @click.option("--until-terminal", "until_terminal", is_flag=True, help="With --run: exit once every named run is terminal, with wait's exit code.")
    @click.option("--timeout", help="Stop after this long (with --until-terminal: exit 13, like wait).")
    @click.option("--format", "fmt", type=click.Choice(["casruns", "homeboy"]), default="casruns", show_default=True,
                  help="casruns/event/v1 events, or homeboy/run-lifecycle-record/v1 records (JSON either way).")
    @json_option
    @click.pass_obj
    def events(obj, since, from_start, from_now, follow, run_ids, labels, types, until_terminal, timeout, fmt, as_json):
        """Print the registry's events in order (NDJSON with --json); --follow keeps going."""
        state: dict = {}
        stream = obj.registry.events(
            since=since, from_start=from_start, from_now=from_now, follow=follow, run_ids=run_ids,
            labels=options.parse_labels(labels), types=types, until_terminal=until_terminal,
            timeout=options.parse_duration(timeout), state=state,
        )
        convert = None
        if fmt == "homeboy":
            from ..homeboy import from_event as convert
        out = sys.stdout
        try:
            for event in stream:
                if convert is not None:
                    out.write(render.dump_json(convert(event)) + "\n")
                elif as_json:
                    out.write(render.dump_json(event) + "\n")
                else:
                    from ..events import line

                    out.write(line(event) + "\n")
                out.flush()  # a follower reads each event as it happens
        except KeyboardInterrupt:
            return 130
        if not until_terminal:
            return 0
        if state.get("timed_out"):
            return E.EXIT_WAIT_TIMEOUT
        from .runs import exit_for_status

        return max((exit_for_status(s) for s in state.get("statuses", {}).values()), default=0)
