"""Options and argument conversions shared by the command families.

Conversions (labels, durations) run in the command's body, not as click callbacks: a
callback runs while click parses, so ``submit --label x`` would then report the bad label
(exit 3) before the missing command (a usage error, exit 2).
"""

from __future__ import annotations

from collections.abc import Iterable

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (errors too).")


def label_option(help: str):
    return click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help=help)


def list_filter_options(f):
    """``--status``, ``--label``, ``--since``, ``--limit``, ``--promoted/--not-promoted``: the
    filters of ``list`` and ``archive list`` (spec/cli.md)."""
    opts = [
        click.option("--status", "statuses", multiple=True, help="Only runs with this status (repeatable)."),
        label_option("Only runs with this label (repeatable)."),
        click.option("--since", help="Only runs created since TIME (RFC 3339 or a duration ago, e.g. 2h)."),
        click.option("--limit", type=int, help="At most N runs."),
        click.option("--promoted/--not-promoted", "promoted", default=None, help="Only promoted (or only unpromoted) runs."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def submit_options(f):
    """The options of ``submit`` and ``run`` (spec/cli.md, "Submit options") and the command."""
    opts = [
        click.option("--provider", default="shell", show_default=True, help="Provider plugin that boots the sandbox."),
        click.option("--timeout", help="Wall-clock limit, e.g. 90s, 15m, 2h."),
        label_option("Label (repeatable)."),
        click.option("--secret-env", "secret_env", multiple=True, metavar="NAME", help="Pass a secret env variable; only its name is stored."),
        click.option("--env", "env", multiple=True, metavar="NAME[=VALUE]", help="Pass an env variable (value from here if omitted)."),
        click.option("--cwd", help="Working directory of the command (default: the current one)."),
        click.option("--recipe", help="Opaque recipe reference stored for replay."),
        click.option("--run-id", "run_id", help="Caller-chosen run id (idempotent submission)."),
        click.option("--retain-for", "retain_for", help="Keep the finished run at least this long, e.g. 30d."),
        click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``--label KEY=VALUE`` values as a dict (``invalid_input`` for a malformed one)."""
    from ..registry import parse_labels

    return parse_labels(items)


def parse_duration(text: str | None) -> float | None:
    """A duration option (``90s``, ``15m``, ``1h30m``) in seconds; None when not given."""
    from ..timefmt import parse_duration

    return parse_duration(text) if text else None


def optional_run_ids(items: Iterable[str]) -> list[str] | None:
    """Optional ``RUN_ID...`` arguments: None (meaning every run) when none are given."""
    return list(items) or None
