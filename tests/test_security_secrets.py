"""Declared secrets never reach disk or a terminal through side doors (issue 14, item 6)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import cli, cli_json, poll_until

SECRET = "s3cr3t-Value-7f2c9e"


def every_file_bytes(root: Path) -> bytes:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            out.append(p.read_bytes())
    return b"\n".join(out)


def test_a_secret_inside_another_env_value_never_reaches_env_json(registry, casruns_home):
    env = {"TOKEN": SECRET, **os.environ}
    rec = registry.submit(
        ["sh", "-c", f'[ "$DATABASE_URL" = "postgres://app:{SECRET}@db" ] && echo match'],
        env=[f"DATABASE_URL=postgres://app:{SECRET}@db"], secret_env=["TOKEN"], environ=env, spawn=False,
    )
    rid = rec["run_id"]
    assert SECRET.encode() not in every_file_bytes(casruns_home)
    m = registry.manifest(rid)
    assert m["request"]["env_redacted"] == ["DATABASE_URL"]


@pytest.mark.slow
def test_the_command_still_gets_the_real_value_of_a_variable_stored_masked(registry, casruns_home):
    (casruns_home / "config.toml").write_text("max_running = 1\n")
    env = {"TOKEN": SECRET}
    blocker = json.loads(cli("submit", "--json", "--", "sleep", "30", check=0).stdout)["run_id"]
    rid = json.loads(cli(
        "submit", "--json", "--secret-env", "TOKEN", "--env", f"DATABASE_URL=postgres://app:{SECRET}@db", "--",
        "sh", "-c", f'[ "$DATABASE_URL" = "postgres://app:{SECRET}@db" ] && echo match', env=env, check=0,
    ).stdout)["run_id"]
    assert SECRET.encode() not in every_file_bytes(casruns_home)
    cli("cancel", blocker, check=0)
    final = poll_until(lambda: (r := json.loads(cli("status", rid, "--json").stdout))["terminal"] and r, what="terminal")
    assert final["status"] == "succeeded", final
    assert cli("logs", rid, check=0).stdout == "match\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--cwd", f"/nonexistent/{SECRET}"],
        ["--timeout", SECRET],
        ["--run-id", f"{SECRET}!"],
        ["--provider", SECRET],
        ["--label", f"k={SECRET}\n"],
        ["--retain-for", f"x{SECRET}"],
    ],
    ids=["cwd", "timeout", "run-id", "provider", "label", "retain-for"],
)
def test_submit_errors_never_echo_a_declared_secret(casruns_home, args):
    for as_json in (False, True):
        extra = ["--json"] if as_json else []
        proc = cli("submit", *extra, "--secret-env", "TOKEN", *args, "--", "true", env={"TOKEN": SECRET})
        assert proc.returncode in (2, 3, 4), (args, proc.returncode, proc.stderr, proc.stdout)
        assert SECRET not in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        assert (proc.stdout + proc.stderr).strip(), "the error still says something"


@pytest.mark.parametrize("label", [SECRET, f"bad key {SECRET}=v", f"k={SECRET}" + "x" * 1100])
def test_label_errors_never_echo_a_declared_secret(casruns_home, label):
    for extra in ([], ["--json"]):
        proc = cli("submit", *extra, "--secret-env", "TOKEN", "--label", label, "--", "true", env={"TOKEN": SECRET})
        assert proc.returncode == 3, (proc.stdout, proc.stderr)
        assert SECRET not in proc.stdout + proc.stderr and "label" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_secret_in_cwd_or_recipe_never_reaches_the_manifest(casruns_home, tmp_path):
    workdir = tmp_path / f"d-{SECRET}"
    workdir.mkdir()
    rid = json.loads(cli("submit", "--json", "--secret-env", "TOKEN", "--cwd", str(workdir), "--recipe", f"make {SECRET}",
                         "--", "sh", "-c", f'[ "$PWD" = "{workdir}" ] && echo right-dir', env={"TOKEN": SECRET}, check=0).stdout)["run_id"]
    final = poll_until(lambda: (r := json.loads(cli("status", rid, "--json").stdout))["terminal"] and r, what="terminal")
    assert final["status"] == "succeeded", final
    assert cli("logs", rid, check=0).stdout == "right-dir\n"  # the command ran in the real directory
    assert SECRET.encode() not in every_file_bytes(casruns_home)
    proc, out = cli_json("replay", rid, env={"TOKEN": SECRET})
    assert proc.returncode == 3 and "held a secret" in out[0]["error"]["message"]
