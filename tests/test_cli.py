"""The shape of the command line: its commands, their help, and what the CLI may touch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from casruns.cli.app import build_cli
from casruns.follow import follow_streams
from conftest import poll_until

CLI_DIR = Path(__file__).resolve().parent.parent / "casruns" / "cli"

COMMANDS = {
    "archive", "artifacts", "cancel", "cat", "events", "export", "serve", "gc", "init", "list", "logs", "migrate", "plugins",
    "promote", "reap", "replay", "resume", "retain", "run", "scan", "status", "submit", "unpromote", "verify", "wait",
}


def command_paths():
    cli = build_cli()
    paths = []
    for name, cmd in sorted(cli.commands.items()):
        paths.append([name])
        paths.extend([name, sub] for sub in sorted(getattr(cmd, "commands", {})))
    return paths


def test_the_group_lists_every_command():
    assert set(build_cli().commands) == COMMANDS
    assert set(build_cli().commands["archive"].commands) == {"push", "pull", "list", "status", "artifacts", "logs", "cat", "gc", "config"}


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_command_has_help_and_takes_json(path):
    result = CliRunner().invoke(build_cli(), [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {' '.join(path)} ")
    if path != ["archive"]:
        assert "--json" in result.output


def test_each_build_makes_a_new_group():
    """Built by a function, not at import time: two builds share no command objects."""
    a, b = build_cli(), build_cli()
    assert a is not b and a.commands["status"] is not b.commands["status"]


def test_the_cli_opens_no_registry_file_itself():
    """Run directories and spool files are read below the CLI (the registry, casruns.follow)."""
    pattern = re.compile(r"\bos\.open\(|(?<![\w.])open\(|\.spool\(|run_dir\(")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(CLI_DIR.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_follow_streams_yields_live_output_then_ends(registry):
    rid = registry.submit(["sh", "-c", "echo one; echo two >&2; sleep 0.5; echo three"])["run_id"]
    got: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for stream, data in follow_streams(registry, rid):
        got[stream] += data
    assert got == {"stdout": b"one\nthree\n", "stderr": b"two\n"}
    assert registry.get(rid)["terminal"]


def test_follow_streams_of_a_finished_run_reads_the_stored_logs(registry):
    rid = registry.submit(["sh", "-c", "echo out; echo err >&2"])["run_id"]
    poll_until(lambda: registry.get(rid)["terminal"], what="the run to end")
    assert list(follow_streams(registry, rid)) == [("stdout", b"out\n"), ("stderr", b"err\n")]
    assert list(follow_streams(registry, rid, ["stderr"])) == [("stderr", b"err\n")]


def test_follow_streams_without_streams_only_waits(registry):
    rid = registry.submit(["sh", "-c", "echo out; sleep 0.3"])["run_id"]
    assert list(follow_streams(registry, rid, ())) == []
    assert registry.get(rid)["terminal"]
