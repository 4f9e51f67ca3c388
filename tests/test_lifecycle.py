"""End to end: the real casruns executable, real detached supervisors, real commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import casruns_exe, cli, cli_json, poll_until

pytestmark = pytest.mark.slow


def submit(*args, env=None) -> str:
    proc, out = cli_json("submit", *args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out[0]["run_id"]


def status(rid) -> dict:
    proc, out = cli_json("status", rid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out[0]


def wait_status(rid, statuses, timeout=30):
    return poll_until(lambda: (s := status(rid))["status"] in statuses and s, timeout=timeout, what=f"{rid} in {statuses}")


def manifest(home: Path, rid: str) -> dict:
    import tomllib

    return tomllib.loads((home / "runs" / rid / "manifest.toml").read_text())


def write_config(home: Path, text: str) -> None:
    cli("init", check=0)
    (home / "config.toml").write_text(text)


def test_submit_returns_at_once_and_run_is_queryable_after_submitter_exits(casruns_home, validate):
    t0 = time.monotonic()
    proc, out = cli_json(
        "submit", "--label", "suite=unit", "--label", "branch=main", "--", "sh", "-c",
        'echo "hello $CASRUNS_RUN_ID"; echo oops >&2; echo data > "$CASRUNS_ARTIFACTS_DIR/result.txt"',
    )
    assert proc.returncode == 0
    assert time.monotonic() - t0 < 10
    rec = validate(out[0], "run.schema.json")
    rid = rec["run_id"]
    assert rec["status"] in ("queued", "booting", "running", "collecting_artifacts", "succeeded")
    proc, waited = cli_json("wait", rid, "--timeout", "30")
    assert proc.returncode == 0
    final = validate(status(rid), "run.schema.json")
    assert final["status"] == "succeeded" and final["terminal"] and final["exit_code"] == 0
    assert final["labels"] == {"suite": "unit", "branch": "main"}
    assert final["artifacts"]["files"] == 1 and final["artifacts"]["bytes"] == 5
    assert final["logs"]["stdout"]["size"] == len(f"hello {rid}\n")
    assert final["heartbeat_at"] and final["last_activity_at"] and final["started_at"] and final["finished_at"]
    assert cli("logs", rid, check=0).stdout == f"hello {rid}\n"
    assert cli("logs", rid, "--stream", "stderr", check=0).stdout == "oops\n"
    transcript = cli("logs", rid, "--stream", "transcript", check=0).stdout.splitlines()
    assert sorted(line.split(" ", 1)[1] for line in transcript) == sorted([f"stdout hello {rid}", "stderr oops"])
    assert cli("cat", rid, "result.txt", check=0).stdout == "data\n"
    # the workspace is gone once everything is in the store
    assert not (casruns_home / "runs" / rid / "spool").exists()


def test_registry_files_are_private(casruns_home):
    rid = submit("--", "sh", "-c", 'echo x > "$CASRUNS_ARTIFACTS_DIR/a"')
    cli("wait", rid, check=0)
    for path in [casruns_home, *casruns_home.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, path
        else:
            assert mode & 0o077 == 0, path


def test_failed_command_records_exit_code(casruns_home):
    rid = submit("--", "sh", "-c", "exit 3")
    proc = cli("wait", rid)
    assert proc.returncode == 10
    rec = status(rid)
    assert rec["status"] == "failed" and rec["exit_code"] == 3
    assert rec["error"]["code"] == "command_failed"


def test_missing_command_fails_cleanly(casruns_home):
    rid = submit("--", "/nonexistent/binary")
    assert cli("wait", rid).returncode == 10
    rec = status(rid)
    assert rec["error"]["code"] == "spawn_failed" and "/nonexistent/binary" in rec["error"]["message"]


def test_timeout_kills_the_group_and_keeps_partial_output(casruns_home):
    write_config(casruns_home, 'kill_grace = "1s"\n')
    t0 = time.monotonic()
    # the child ignores SIGTERM, so only the SIGKILL after the grace period stops it
    rid = submit("--timeout", "1s", "--", "sh", "-c",
                 "trap '' TERM; echo before; echo art > \"$CASRUNS_ARTIFACTS_DIR/partial\"; sleep 30 & wait; sleep 30")
    proc = cli("wait", rid, "--timeout", "25")
    assert proc.returncode == 11
    assert time.monotonic() - t0 < 20
    rec = status(rid)
    assert rec["status"] == "timed_out" and rec["error"]["code"] == "timeout"
    assert rec["deadline_at"]
    assert cli("logs", rid, check=0).stdout == "before\n"
    assert rec["artifacts"]["files"] == 1


def test_run_in_foreground_streams_and_maps_exit_codes(casruns_home):
    proc = cli("run", "--", "sh", "-c", "echo to-out; echo to-err >&2")
    assert proc.returncode == 0
    assert proc.stdout == "to-out\n" and proc.stderr == "to-err\n"
    assert cli("run", "--", "false").returncode == 10
    proc = cli("run", "--timeout", "1", "--", "sleep", "20")
    assert proc.returncode == 11


def test_cancel_queued_and_running_runs(casruns_home, validate):
    write_config(casruns_home, "max_running = 1\nkill_grace = \"2s\"\n")
    busy = submit("--", "sh", "-c", "echo started; sleep 30")
    wait_status(busy, {"running"})
    queued = submit("--", "echo", "never")
    time.sleep(0.5)
    assert status(queued)["status"] == "queued"
    proc, out = cli_json("cancel", queued, "--reason", "not needed")
    assert proc.returncode == 0
    validate(out[0], "reports.schema.json#/$defs/cancel")
    assert out[0]["outcome"] == "cancelled"
    rec = status(queued)
    assert rec["status"] == "cancelled" and rec["cancel"]["reason"] == "not needed"
    assert rec["started_at"] is None  # it never ran
    proc, out = cli_json("cancel", busy, "--reason", "operator")
    assert out[0]["outcome"] == "requested"
    final = wait_status(busy, {"cancelled"}, timeout=20)
    assert final["cancel"]["reason"] == "operator"
    assert cli("logs", busy, check=0).stdout == "started\n"
    # idempotent: cancelling again changes nothing and says so
    proc, out = cli_json("cancel", busy)
    assert proc.returncode == 0 and out[0]["outcome"] == "already_terminal"
    assert status(busy)["finished_at"] == final["finished_at"]
    proc = cli("cancel", busy)
    assert "already cancelled" in proc.stdout


def test_supervisor_sigkilled_is_reaped_with_partial_logs(casruns_home):
    marker = casruns_home.parent / "child-alive"
    rid = submit("--", "sh", "-c", f'echo partial; echo art > "$CASRUNS_ARTIFACTS_DIR/a"; while true; do touch {marker}; sleep 0.2; done')
    wait_status(rid, {"running"})
    poll_until(lambda: cli("logs", rid).stdout == "partial\n", what="partial output")
    m = manifest(casruns_home, rid)
    os.kill(m["supervisor"]["pid"], signal.SIGKILL)
    rec = poll_until(lambda: (s := status(rid))["terminal"] and s, timeout=20, what="reaped")
    assert rec["status"] == "failed"
    assert rec["error"]["code"] == "supervisor_lost"
    assert cli("logs", rid, check=0).stdout == "partial\n"
    assert rec["artifacts"]["files"] == 1
    # the orphaned command was killed too (pid identity checked by start time)
    time.sleep(0.5)
    before = marker.stat().st_mtime
    time.sleep(1.0)
    assert marker.stat().st_mtime == before


def test_sighup_does_not_stop_a_supervisor(casruns_home):
    rid = submit("--", "sh", "-c", "sleep 1; echo done")
    wait_status(rid, {"running"})
    os.kill(manifest(casruns_home, rid)["supervisor"]["pid"], signal.SIGHUP)
    assert cli("wait", rid, "--timeout", "20").returncode == 0
    assert cli("logs", rid).stdout == "done\n"


def test_reap_restarts_queued_run_whose_supervisor_died(casruns_home):
    write_config(casruns_home, "max_running = 1\n")
    busy = submit("--", "sleep", "3")
    wait_status(busy, {"running"})
    queued = submit("--env", "GREETING=hi", "--", "sh", "-c", 'echo "$GREETING"')
    poll_until(lambda: manifest(casruns_home, queued).get("supervisor"), what="queued supervisor")
    os.kill(manifest(casruns_home, queued)["supervisor"]["pid"], signal.SIGKILL)
    time.sleep(0.3)
    assert status(queued)["status"] == "queued"
    proc, out = cli_json("reap")
    assert queued in out[0]["restarted"]
    assert cli("wait", queued, "--timeout", "30").returncode == 0
    assert cli("logs", queued).stdout == "hi\n"


def test_follow_streams_live_output_and_ends_with_the_run(casruns_home):
    rid = submit("--", "sh", "-c", "for i in 1 2 3 4; do echo line$i; sleep 0.4; done")
    follower = subprocess.Popen(casruns_exe() + ["logs", rid, "--follow"], stdout=subprocess.PIPE, text=True)
    first = follower.stdout.readline()
    assert first == "line1\n"
    assert status(rid)["status"] in ("running", "booting")  # we saw output while it ran
    rest = follower.stdout.read()
    assert follower.wait(timeout=20) == 0
    assert first + rest == "line1\nline2\nline3\nline4\n"


def test_idempotent_submit_with_caller_run_id(casruns_home):
    a = submit("--run-id", "job-42", "--label", "k=v", "--", "echo", "once")
    b = submit("--run-id", "job-42", "--label", "k=v", "--", "echo", "once")
    assert a == b == "job-42"
    proc, out = cli_json("submit", "--run-id", "job-42", "--", "echo", "different")
    assert proc.returncode == 5 and out[0]["error"]["code"] == "run_id_conflict"
    cli("wait", "job-42", check=0)
    assert cli("logs", "job-42").stdout == "once\n"


def test_artifacts_symlinks_are_recorded_never_followed_and_export_refuses_escapes(casruns_home, tmp_path, validate):
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("must not be collected")
    rid = submit("--", "sh", "-c",
                 'cd "$CASRUNS_ARTIFACTS_DIR" && mkdir -p d && echo ok > d/good.txt && '
                 f'ln -s {outside} abs-link && ln -s ../../../etc evil-rel && ln -s {tmp_path} dirlink && ln -s d/good.txt inside-link')
    cli("wait", rid, check=0)
    proc, out = cli_json("artifacts", rid)
    arts = validate(out[0], "reports.schema.json#/$defs/artifacts")
    by_path = {e["path"]: e for e in arts["entries"]}
    assert by_path["d/good.txt"]["type"] == "file"
    assert {p for p, e in by_path.items() if e["type"] == "symlink"} == {"abs-link", "evil-rel", "dirlink", "inside-link"}
    assert arts["files"] == 1  # nothing behind a link was read
    dest = tmp_path / "export"
    proc, out = cli_json("export", rid, dest)
    report = validate(out[0], "reports.schema.json#/$defs/export")
    assert (dest / "artifacts" / "d" / "good.txt").read_text() == "ok\n"
    assert os.readlink(dest / "artifacts" / "inside-link") == "d/good.txt"
    refused = {r["path"] for r in report["refused"]}
    assert refused == {"abs-link", "evil-rel", "dirlink"}
    assert not (dest / "artifacts" / "abs-link").exists()
    assert (dest / "logs" / "stdout.log").exists()
    # a ../ path given to cat is refused before any lookup
    proc, out = cli_json("cat", rid, "../../config.toml")
    assert proc.returncode == 3 and out[0]["error"]["code"] == "unsafe_path"


def test_export_refuses_crafted_tree_with_dotdot_and_absolute_paths(registry, tmp_path):
    from casruns import manifest as mf
    from casruns.tree import Tree, TreeEntry

    good = registry.store.put_bytes(b"fine")
    bad = registry.store.put_bytes(b"evil")
    tree = Tree([TreeEntry("ok.txt", "file", 0o644, 4, good.address),
                 TreeEntry("../escape.txt", "file", 0o644, 4, bad.address),
                 TreeEntry("/abs.txt", "file", 0o644, 4, bad.address)])
    tree_addr = tree.store(registry.store)
    rid = registry.submit(["true"], spawn=False)["run_id"]
    run = registry.run_dir(rid)
    with run.update() as m:
        for s in ("booting", "running", "collecting_artifacts", "succeeded"):
            mf.transition(m, s, "2026-11-24T22:00:00.000000Z")
        m["artifacts"] = {"tree": tree_addr, "files": 3, "bytes": 12}
    dest = tmp_path / "out"
    report = registry.export(rid, str(dest))
    assert report["files"] == 1
    assert {r["path"] for r in report["refused"]} == {"../escape.txt", "/abs.txt"}
    assert not (tmp_path / "escape.txt").exists() and not (dest / "escape.txt").exists()
    assert not Path("/abs.txt").exists()


def test_json_errors_and_exit_codes(casruns_home, validate):
    proc, out = cli_json("status", "NOPE")
    assert proc.returncode == 4
    assert validate(out[0], "error.schema.json")["error"]["code"] == "run_not_found"
    proc, out = cli_json("status", "../etc")
    assert proc.returncode == 3 and out[0]["error"]["code"] == "invalid_run_id"
    proc = cli("status", "../etc")
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("casruns: error:")
    proc, out = cli_json("submit", "--timeout", "soon", "--", "true")
    assert proc.returncode == 3 and validate(out[0], "error.schema.json")["error"]["code"] == "invalid_input"
    proc, out = cli_json("submit", "--secret-env", "NOT_SET_ANYWHERE", "--", "true")
    assert proc.returncode == 3 and "NOT_SET_ANYWHERE" in out[0]["error"]["message"]
    proc, out = cli_json("submit", "--provider", "nope", "--", "true")
    assert proc.returncode == 3 and out[0]["error"]["code"] == "unknown_provider"
    proc, out = cli_json("list", "--bogus")
    assert proc.returncode == 2 and validate(out[0], "error.schema.json")["error"]["code"] == "usage"
    # nothing was created by the refused submits
    assert not (casruns_home / "runs").exists() or list((casruns_home / "runs").iterdir()) == []


def test_newer_registry_format_is_refused(casruns_home):
    cli("init", check=0)
    (casruns_home / "casruns-registry.toml").write_text('format = "casruns-registry"\nversion = 99\n')
    proc, out = cli_json("list")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "unsupported_format"
    proc, out = cli_json("submit", "--", "true")
    assert proc.returncode == 6


def test_fast_path_and_click_path_print_the_same(casruns_home):
    rid = submit("--label", "a=b", "--", "echo", "x")
    cli("wait", rid, check=0)
    for args in (["status", rid], ["status", rid, "--json"], ["list"], ["list", "--json", "--status", "succeeded", "--label", "a=b"],
                 ["status", "missing"], ["status", "missing", "--json"], ["list", "--limit", "1"]):
        fast = cli(*args)
        slow = cli(*args, env={"CASRUNS_NO_FASTPATH": "1"})
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), args


def test_list_filters_and_orders_newest_first(casruns_home, validate):
    ids = [submit("--label", f"n={i}", "--label", "suite=x" if i % 2 else "suite=y", "--", "true") for i in range(4)]
    for rid in ids:
        cli("wait", rid, check=0)
    proc, out = cli_json("list")
    listing = validate(out[0], "list.schema.json")
    assert [r["run_id"] for r in listing["runs"]] == list(reversed(ids))
    _, out = cli_json("list", "--label", "suite=x")
    assert [r["run_id"] for r in out[0]["runs"]] == [ids[3], ids[1]]
    _, out = cli_json("list", "--limit", "2", "--status", "succeeded")
    assert [r["run_id"] for r in out[0]["runs"]] == [ids[3], ids[2]]
    _, out = cli_json("list", "--status", "failed")
    assert out[0]["runs"] == []
    _, out = cli_json("list", "--since", "1h")
    assert len(out[0]["runs"]) == 4
    _, out = cli_json("list", "--since", "2000-01-01T00:00:00Z")
    assert len(out[0]["runs"]) == 4
    proc, out = cli_json("list", "--status", "bogus")
    assert proc.returncode == 3


def test_secret_env_value_never_reaches_the_registry(casruns_home):
    secret = "s3cr3t-V4lue-for-test"
    rid = submit("--secret-env", "API_TOKEN", "--label", f"note={secret}", "--", "sh", "-c",
                 f'echo "token is $API_TOKEN"; printf "%s" "$API_TOKEN" > "$CASRUNS_ARTIFACTS_DIR/t"; echo {secret}',
                 env={"API_TOKEN": secret})
    cli("wait", rid, check=0)
    assert "[REDACTED:API_TOKEN]" in cli("logs", rid).stdout
    rec = status(rid)
    assert rec["replay"]["secret_env"] == ["API_TOKEN"]
    assert secret not in json.dumps(rec)
    for path in casruns_home.rglob("*"):
        if path.is_file() and "blobs" not in path.parts:
            assert secret.encode() not in path.read_bytes(), path
    # log blobs are compressed: check their decoded content
    from casruns import Registry

    reg = Registry(casruns_home)
    for stream in ("stdout", "stderr", "transcript"):
        assert secret.encode() not in b"".join(reg.log_chunks(rid, stream))


def test_burst_of_200_with_limit_2_runs_each_exactly_once(casruns_home, tmp_path):
    write_config(casruns_home, "max_running = 2\n")
    log = tmp_path / "runs.log"
    script = f'echo "start $CASRUNS_RUN_ID $(date +%s%N)" >> {log}; sleep 0.05; echo "end $CASRUNS_RUN_ID $(date +%s%N)" >> {log}'
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda i: submit("--label", f"i={i}", "--", "sh", "-c", script), range(200)))
    submit_time = time.monotonic() - t0
    assert len(set(ids)) == 200
    assert submit_time < 120
    proc = cli("wait", *ids, "--timeout", "300", timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:]
    events = [line.split() for line in log.read_text().splitlines()]
    starts = [e[1] for e in events if e[0] == "start"]
    assert sorted(starts) == sorted(ids)  # every run ran, none twice
    # at most 2 ran at once
    timeline = sorted((int(ts), 1 if kind == "start" else -1) for kind, _, ts in events)
    running = peak = 0
    for _, delta in timeline:
        running += delta
        peak = max(peak, running)
    assert peak <= 2
    _, out = cli_json("list", "--status", "succeeded")
    assert len(out[0]["runs"]) == 200
    assert not os.listdir(casruns_home / "queue")


def _bump(home, rid, n, q):
    from casruns import Registry

    run = Registry(home).run_dir(rid)
    for _ in range(n):
        with run.update() as m:
            m["counter"] = m.get("counter", 0) + 1
    q.put(True)


def test_manifest_updates_serialize_across_processes(registry):
    import multiprocessing

    rid = registry.submit(["true"], spawn=False)["run_id"]
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_bump, args=(registry.root, rid, 100, q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        q.get(timeout=120)
        p.join(timeout=60)
    assert registry.run_dir(rid).read()["counter"] == 400


def test_concurrent_cancel_never_lost_against_supervisor_updates(casruns_home):
    """Cancel at many points of many runs' lives: each cancel that was accepted must end the
    run cancelled with its reason, and the supervisor's own fields must survive too."""
    write_config(casruns_home, 'max_running = 4\nkill_grace = "1s"\n')
    ids = [submit("--", "sh", "-c", f"sleep 0.{i % 5}; echo out{i}") for i in range(12)]
    outcomes = {}
    for i, rid in enumerate(ids):
        time.sleep(0.03 * (i % 6))
        _, out = cli_json("cancel", rid, "--reason", f"race-{i}")
        outcomes[rid] = out[0]["outcome"]
    cli("wait", *ids, "--timeout", "60")
    for i, rid in enumerate(ids):
        rec = status(rid)
        assert rec["terminal"]
        m = manifest(casruns_home, rid)
        if outcomes[rid] in ("cancelled", "requested"):
            assert rec["status"] == "cancelled", (rid, outcomes[rid], rec["status"])
            assert rec["cancel"]["reason"] == f"race-{i}"
        else:
            assert outcomes[rid] == "already_terminal" and rec["status"] == "succeeded"
            assert rec["cancel"] is None
        if rec["started_at"]:
            assert "supervisor" in m and "logs" in m  # the supervisor's writes were not lost either


def test_heartbeat_advances_without_rewriting_the_manifest(casruns_home):
    rid = submit("--", "sleep", "4")
    wait_status(rid, {"running"})
    mpath = casruns_home / "runs" / rid / "manifest.toml"
    first = status(rid)["heartbeat_at"]
    before = mpath.stat().st_mtime_ns
    time.sleep(2.5)
    second = status(rid)
    assert second["heartbeat_at"] > first
    assert mpath.stat().st_mtime_ns == before
    cli("wait", rid, check=0)
    final = status(rid)
    assert final["heartbeat_at"] >= second["heartbeat_at"]


def test_short_secret_values_are_not_masked_and_the_record_says_so(casruns_home):
    rid = submit("--secret-env", "FLAG", "--", "sh", "-c", "echo value=1", env={"FLAG": "1"})
    cli("wait", rid, check=0)
    assert cli("logs", rid).stdout == "value=1\n"
    m = manifest(casruns_home, rid)
    assert "FLAG" in m["redaction"]["ignored_secrets"]


def test_sigterm_to_a_queued_supervisor_cancels_the_run(casruns_home):
    write_config(casruns_home, "max_running = 1\n")
    busy = submit("--", "sleep", "3")
    wait_status(busy, {"running"})
    queued = submit("--", "echo", "never")
    poll_until(lambda: manifest(casruns_home, queued).get("supervisor"), what="queued supervisor")
    os.kill(manifest(casruns_home, queued)["supervisor"]["pid"], signal.SIGTERM)
    rec = wait_status(queued, {"cancelled"}, timeout=15)
    assert rec["cancel"]["reason"] == "supervisor received SIGTERM" and rec["started_at"] is None
    assert not os.listdir(casruns_home / "queue") or all(queued not in n for n in os.listdir(casruns_home / "queue"))
