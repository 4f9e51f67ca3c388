"""Replay (run a recorded run again) and resume (continue a failed run from its artifacts)."""

from __future__ import annotations

import json

from conftest import cli, cli_json
from test_plugins import calls, fake, fake_site, submit_fake  # noqa: F401 - fixtures

CHECKPOINTING = (
    'cd "$CASRUNS_ARTIFACTS_DIR"; n=$(cat checkpoint 2>/dev/null || echo 0); '
    'while [ "$n" -lt 8 ]; do n=$((n+1)); echo "$n" > checkpoint; echo "step $n attempt ${CASRUNS_ATTEMPT:-1}"; '
    'if [ -z "$CASRUNS_RESUMED_FROM" ] && [ "$n" -ge 3 ]; then sleep 60; fi; done; echo finished > result'
)


def status(rid):
    return cli_json("status", rid)[1][0]


def test_resume_continues_from_the_checkpoint_after_a_timeout(casruns_home, validate):
    _, out = cli_json("submit", "--timeout", "2s", "--label", "job=ckpt", "--", "sh", "-c", CHECKPOINTING)
    first = out[0]["run_id"]
    assert cli("wait", first, "--timeout", "30").returncode == 11
    assert cli("cat", first, "checkpoint").stdout == "3\n"
    proc, out = cli_json("resume", first)
    assert proc.returncode == 0, out
    second = validate(out[0], "run.schema.json")
    assert second["attempt"] == 2 and second["resumed_from"] == first
    assert cli("wait", second["run_id"], "--timeout", "30").returncode == 0
    log = cli("logs", second["run_id"]).stdout
    assert log.splitlines() == [f"step {i} attempt 2" for i in range(4, 9)]
    assert cli("cat", second["run_id"], "result").stdout == "finished\n"
    assert cli("cat", second["run_id"], "checkpoint").stdout == "8\n"
    # the chain, from either end
    _, out = cli_json("list", "--chain", second["run_id"])
    assert [r["run_id"] for r in out[0]["runs"]] == [first, second["run_id"]]
    _, out = cli_json("list", "--chain", first)
    assert [(r["attempt"], r["resumed_from"]) for r in out[0]["runs"]] == [(1, None), (2, first)]


def test_resume_refuses_succeeded_and_active_runs(casruns_home):
    _, out = cli_json("submit", "--", "true")
    ok = out[0]["run_id"]
    cli("wait", ok, check=0)
    proc, out = cli_json("resume", ok)
    assert proc.returncode == 5 and out[0]["error"]["code"] == "invalid_transition"
    _, out = cli_json("submit", "--", "sleep", "20")
    active = out[0]["run_id"]
    proc, out = cli_json("resume", active)
    assert proc.returncode == 5
    cli("cancel", active, check=0)


def test_replay_rereads_secret_env_and_never_stores_it(casruns_home):
    _, out = cli_json("submit", "--secret-env", "DEPLOY_KEY", "--env", "MODE", "--label", "k=v", "--",
                      "sh", "-c", 'echo "mode=$MODE key=$DEPLOY_KEY"', env={"DEPLOY_KEY": "first-secret-value", "MODE": "fast"})
    first = out[0]["run_id"]
    cli("wait", first, check=0)
    rec = status(first)
    assert rec["replay"]["secret_env"] == ["DEPLOY_KEY"] and rec["replay"]["env_names"] == ["MODE"]
    assert rec["replay"]["command"] == f"casruns replay {first}"
    # missing secret: a clear error before anything is created
    runs_before = {r["run_id"] for r in cli_json("list")[1][0]["runs"]}
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DEPLOY_KEY",)}
    env["MODE"] = "slow"
    import subprocess
    from conftest import casruns_exe

    p = subprocess.run(casruns_exe() + ["replay", "--json", first], env=env, capture_output=True, text=True)
    assert p.returncode == 3 and "DEPLOY_KEY" in json.loads(p.stdout)["error"]["message"]
    assert {r["run_id"] for r in cli_json("list")[1][0]["runs"]} == runs_before
    proc, out = cli_json("replay", first, env={"DEPLOY_KEY": "second-secret-value", "MODE": "slow"})
    again = out[0]
    assert again["replay_of"] == first and again["labels"] == {"k": "v"}
    cli("wait", again["run_id"], check=0)
    assert cli("logs", again["run_id"]).stdout == "mode=slow key=[REDACTED:DEPLOY_KEY]\n"
    for path in casruns_home.rglob("*.toml"):
        assert b"second-secret-value" not in path.read_bytes() and b"first-secret-value" not in path.read_bytes()


def test_replay_refuses_a_command_line_stored_redacted(casruns_home):
    _, out = cli_json("submit", "--", "sh", "-c", "true", "password=hunter2hunter2")
    rid = out[0]["run_id"]
    cli("wait", rid, check=0)
    proc, out = cli_json("replay", rid)
    assert proc.returncode == 3 and "redacted" in out[0]["error"]["message"]


def test_hook_casruns_resume(fake):
    rid = submit_fake(fake, "--label", "fake.max_attempts=2", cmd=("sh", "-c", 'echo "snap=$FAKESANDBOX_SNAPSHOT"; exit 1'))
    cli("wait", rid, "--timeout", "30")
    proc, out = cli_json("resume", rid)
    second = out[0]["run_id"]
    cli("wait", second, "--timeout", "30")
    assert cli("logs", second).stdout == f"snap=snap-{rid}\n"
    proc, out = cli_json("resume", second)
    assert proc.returncode == 8 and "exceeds fake.max_attempts=2" in out[0]["error"]["message"]
