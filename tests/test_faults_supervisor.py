"""Targeted faults in the supervisor's life: each test stops the code in one named crash window
(casruns/faults.py) or changes one thing under it (its clock, a process that leaves its group),
then checks what the registry says afterwards."""

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


def status(rid) -> dict:
    proc, out = cli_json("status", rid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out[0]


def wait_terminal(rid, timeout=60) -> dict:
    return poll_until(lambda: (s := status(rid))["terminal"] and s, timeout=timeout, what=f"{rid} terminal")


def manifest(home: Path, rid: str) -> dict:
    import tomllib

    return tomllib.loads((home / "runs" / rid / "manifest.toml").read_text())


def write_config(home: Path, text: str) -> None:
    cli("init", check=0)
    (home / "config.toml").write_text(text)


# -- item 1: the payload hand-over --------------------------------------------------------


@pytest.mark.parametrize("point", ["submit_after_spawn", "submit_mid_payload"])
def test_submitter_dying_during_the_hand_over_fails_the_run_without_running_it(casruns_home, tmp_path, point, validate):
    marker = tmp_path / "ran"
    proc = cli(
        "submit", "--run-id", "handover-1", "--env", "FOO=bar", "--",
        "sh", "-c", f'touch {marker}; echo "FOO=$FOO"',
        env={"CASRUNS_TEST_FAULT": point},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # stopped exactly there
    final = validate(wait_terminal("handover-1"), "run.schema.json")
    assert final["status"] == "failed"
    assert final["error"]["code"] == "payload_incomplete"
    assert "replay" in final["error"]["message"]
    assert not marker.exists(), "the command ran with a payload other than the one submitted"
    assert cli("wait", "handover-1", "--timeout", "5").returncode == 10
    # nothing is left queued behind it
    assert not list((casruns_home / "queue").iterdir())


def _queued_behind_blocker(home: Path, tmp_path: Path, *, umask: int = 0o022):
    write_config(home, "max_running = 1\n")
    blocker = json.loads(cli("submit", "--json", "--", "sleep", "60", check=0).stdout)["run_id"]
    poll_until(lambda: status(blocker)["status"] == "running", what="blocker running")
    out = tmp_path / "out.txt"
    proc = subprocess.run(
        casruns_exe() + ["submit", "--json", "--run-id", "queued-1", "--env", "FOO=bar", "--",
                         "sh", "-c", f'echo "FOO=$FOO umask=$(umask)" > {out}'],
        capture_output=True, text=True, umask=umask, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pid = poll_until(lambda: (manifest(home, "queued-1").get("supervisor") or {}).get("pid"), what="queued supervisor")
    os.kill(pid, signal.SIGKILL)
    poll_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), what="supervisor gone")
    return blocker, out


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("point", ["reap_after_spawn", "reap_mid_payload"])
def test_reaper_dying_during_the_hand_over_fails_the_queued_run_without_running_it(casruns_home, tmp_path, point):
    blocker, out = _queued_behind_blocker(casruns_home, tmp_path)
    proc = cli("reap", env={"CASRUNS_TEST_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    final = wait_terminal("queued-1")
    assert final["status"] == "failed" and final["error"]["code"] == "payload_incomplete"
    cli("cancel", blocker, check=0)
    wait_terminal(blocker)
    time.sleep(1.0)  # a slot is free now: a supervisor that wrongly kept going would run it
    assert not out.exists()
    assert status("queued-1")["status"] == "failed"


def test_reap_restarts_a_queued_run_with_its_submitted_env_and_umask(casruns_home, tmp_path):
    blocker, out = _queued_behind_blocker(casruns_home, tmp_path, umask=0o027)
    report = json.loads(cli("reap", "--json", check=0).stdout)
    assert report["restarted"] == ["queued-1"]
    cli("cancel", blocker, check=0)
    final = wait_terminal("queued-1")
    assert final["status"] == "succeeded", final
    assert out.read_text() == "FOO=bar umask=0027\n"


def test_a_truncated_or_garbled_frame_is_refused():
    from casruns.handover import PayloadIncomplete, decode_payload, encode_payload

    frame = encode_payload({"env": {"HOME": "/h"}, "secret_env": {"T": "s3cret"}, "umask": 18})
    assert decode_payload(frame)["env"] == {"HOME": "/h"}
    for cut in range(len(frame)):
        with pytest.raises(PayloadIncomplete):
            decode_payload(frame[:cut])
    flipped = bytearray(frame)
    flipped[frame.index(b"/h")] ^= 0x01
    with pytest.raises(PayloadIncomplete):
        decode_payload(bytes(flipped))
    with pytest.raises(PayloadIncomplete):
        decode_payload(b"")
    with pytest.raises(PayloadIncomplete):
        decode_payload(b"{}")  # what casruns 0.2's supervisor would have taken for an empty payload


def test_every_fault_point_is_listed_and_used():
    import re

    from casruns import faults

    src = Path(faults.__file__).parent
    used = set()
    for path in src.rglob("*.py"):
        if path.name == "faults.py":
            continue
        text = path.read_text()
        used |= set(re.findall(r'faults\.point\("([a-z_]+)"\)', text))
        used |= {"gc_" + p for p in re.findall(r'_fault\("([a-z_]+)"\)', text)}
        for by in re.findall(r'by="([a-z]+)"', text):
            used |= {f"{by}_after_spawn", f"{by}_mid_payload"}
    used |= {"submit_after_spawn", "submit_mid_payload"}  # spawn's default caller
    assert used == set(faults.POINTS), (used ^ set(faults.POINTS))
    spec = (src.parent / "spec" / "format.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)` \| ", spec.split("## Crash windows", 1)[1].split("\n## ", 1)[0], re.M))
    assert listed == set(faults.POINTS), listed ^ set(faults.POINTS)


# -- item 10: a registry whose format record is missing -----------------------------------


def test_a_registry_without_its_format_file_is_an_error_not_an_empty_registry(registry, casruns_home, tmp_path):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    (casruns_home / "casruns-registry.toml").unlink()
    for args in (["list"], ["status", rid], ["gc"], ["reap"], ["verify"], ["archive", "push", str(tmp_path / "arch"), "--promoted"]):
        proc, out = cli_json(*args)
        assert proc.returncode == 6, (args, proc.stdout, proc.stderr)
        assert out[-1]["error"]["code"] == "registry_error", args
        assert "casruns-registry.toml" in out[-1]["error"]["message"]
        plain = cli(*args)
        assert plain.returncode == 6 and len(plain.stderr.strip().splitlines()) == 1, (args, plain.stderr)
    assert (casruns_home / "runs" / rid / "manifest.toml").exists()  # nothing was touched
    assert not (casruns_home / "casruns-registry.toml").exists()


def test_an_empty_or_absent_root_is_still_an_empty_registry(tmp_path):
    root = tmp_path / "nothing-here"
    proc = cli("--root", str(root), "list", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["runs"] == [], proc.stderr


# -- item 9: processes that leave the command's group -------------------------------------


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}") or _zombie(pid)


@pytest.mark.parametrize(
    "escape",
    [
        # setsid: a new session and group, still holding the run's stdout
        'setsid sh -c "echo \\$\\$ > {pidfile}; exec sleep 300" &',
        # a double fork into a new group that ignores SIGTERM and writes nothing
        '(setsid sh -c "trap \\"\\" TERM; echo \\$\\$ > {pidfile}; exec sleep 300" >/dev/null 2>&1 &)',
    ],
    ids=["setsid", "double-fork-ignoring-sigterm"],
)
def test_processes_that_left_the_group_end_with_the_run_and_are_counted(casruns_home, tmp_path, escape, validate):
    write_config(casruns_home, 'kill_grace = "1s"\n')
    pidfile = tmp_path / "escaped.pid"
    script = escape.format(pidfile=pidfile) + f"\nwhile [ ! -s {pidfile} ]; do sleep 0.05; done; echo started"
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", script, check=0).stdout)["run_id"]
    final = validate(wait_terminal(rid), "run.schema.json")
    assert final["status"] == "succeeded", (final["error"], cli("logs", rid, "--stream", "stderr").stdout)
    escaped = int(pidfile.read_text())
    poll_until(lambda: _gone(escaped), timeout=10, what=f"escaped process {escaped} ended")
    assert final["strays_killed"] == 1
    assert cli("logs", rid, check=0).stdout == "started\n"


def test_an_escaped_process_ends_with_a_timed_out_run(casruns_home, tmp_path):
    write_config(casruns_home, 'kill_grace = "1s"\n')
    pidfile = tmp_path / "escaped.pid"
    script = f'setsid sh -c "echo \\$\\$ > {pidfile}; exec sleep 300" & sleep 60'
    rid = json.loads(cli("submit", "--json", "--timeout", "2s", "--", "sh", "-c", script, check=0).stdout)["run_id"]
    final = wait_terminal(rid)
    assert final["status"] == "timed_out"
    poll_until(lambda: _gone(int(pidfile.read_text())), timeout=10, what="escaped process ended")
    assert final["strays_killed"] == 1


def test_a_run_whose_command_stays_in_its_group_records_no_strays(casruns_home):
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", "sleep 0.2 & wait", check=0).stdout)["run_id"]
    final = wait_terminal(rid)
    assert final["status"] == "succeeded" and final["strays_killed"] == 0
    assert final["duration_s"] is not None and final["duration_s"] >= 0.2


# -- item 4: durations on the monotonic clock ---------------------------------------------


def _libfaketime() -> str | None:
    import glob

    found = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1")
    return found[0] if found else None


needs_faketime = pytest.mark.skipif(
    _libfaketime() is None, reason="libfaketime is not installed (apt-get install faketime; .ci/run installs it)"
)


def _supervise_under_faketime(registry, tmp_path, argv, timeout):
    """Submit without a supervisor, then start one whose wall clock the test can move."""
    import sys

    from casruns.handover import encode_payload

    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    rid = registry.submit(argv, timeout=timeout, spawn=False)["run_id"]
    env = {
        "PATH": os.environ["PATH"],
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # the point: only the wall clock jumps
    }
    payload = encode_payload({"env": {"PATH": os.environ["PATH"]}, "secret_env": {}, "umask": 0o022})
    proc = subprocess.Popen(
        [sys.executable, "-m", "casruns.supervisor", str(registry.root), rid],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    proc.stdin.write(payload)
    proc.stdin.close()
    poll_until(lambda: status(rid)["status"] == "running", what="running")
    return rid, clock, proc


@needs_faketime
def test_a_wall_clock_set_back_does_not_stretch_a_timeout(registry, tmp_path):
    rid, clock, proc = _supervise_under_faketime(registry, tmp_path, ["sleep", "40"], "3s")
    clock.write_text("-1h\n")
    try:
        final = wait_terminal(rid, timeout=30)  # the command alone would take 40 s
    finally:
        proc.kill()
        proc.wait()
    assert final["status"] == "timed_out", final
    assert 2.5 <= final["duration_s"] < 30


@needs_faketime
def test_a_wall_clock_set_forward_does_not_cut_a_timeout(registry, tmp_path):
    rid, clock, proc = _supervise_under_faketime(registry, tmp_path, ["sleep", "3"], "1h")
    clock.write_text("+2h\n")
    try:
        final = wait_terminal(rid, timeout=40)
    finally:
        proc.kill()
        proc.wait()
    assert final["status"] == "succeeded", final
    assert final["duration_s"] >= 2.5


# -- a run that cannot start ends failed, never in a restart loop (issue 14, item 9) ------


@pytest.mark.parametrize("value", ["99999999999999999999d", "1e400", "nan", "101y", str(10**12) + "d"])
def test_an_out_of_range_timeout_is_refused_at_submit(casruns_home, value):
    proc, out = cli_json("submit", "--timeout", value, "--", "true")
    assert proc.returncode in (2, 3), proc.stdout + proc.stderr
    assert not (casruns_home / "runs").exists() or not list((casruns_home / "runs").iterdir())


def test_an_error_before_the_run_starts_fails_it_with_start_failed(casruns_home, tmp_path):
    marker = tmp_path / "ran"
    rid = json.loads(cli("submit", "--json", "--", "touch", str(marker),
                         env={"CASRUNS_TEST_FAULT": "supervisor_start=error"}, check=0).stdout)["run_id"]
    final = wait_terminal(rid)
    assert final["status"] == "failed" and final["error"]["code"] == "start_failed", final
    assert "fault injected" in final["error"]["message"]
    assert not marker.exists()


def test_a_config_made_invalid_after_submit_fails_the_run_instead_of_crashing_its_supervisor(registry, casruns_home, tmp_path):
    import sys

    from casruns.handover import encode_payload

    marker = tmp_path / "ran"
    rid = registry.submit(["touch", str(marker)], spawn=False)["run_id"]
    (casruns_home / "config.toml").write_text('heartbeat_interval = "0s"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "casruns.supervisor", str(casruns_home), rid],
        input=encode_payload({"env": {"PATH": os.environ["PATH"]}, "secret_env": {}, "umask": 0o022}),
        capture_output=True, timeout=60,
    )
    assert proc.returncode == 1
    m = manifest(casruns_home, rid)
    assert m["status"] == "failed" and m["error"]["code"] == "start_failed"
    assert "heartbeat_interval" in m["error"]["message"]
    assert not marker.exists()


def test_a_queued_run_whose_supervisors_keep_dying_is_failed_after_three_restarts(casruns_home, tmp_path):
    dying = {"CASRUNS_TEST_FAULT": "supervisor_start=kill"}
    marker = tmp_path / "ran"
    rid = json.loads(cli("submit", "--json", "--", "touch", str(marker), env=dying, check=0).stdout)["run_id"]
    restarts = 0
    for _ in range(6):
        poll_until(lambda: not _supervised(casruns_home, rid), what="supervisor dead")
        report = json.loads(cli("reap", "--json", env=dying, check=0).stdout)
        if rid in report["failed"]:
            break
        assert report["restarted"] == [rid]
        restarts += 1
    assert restarts == 3
    m = manifest(casruns_home, rid)
    assert m["status"] == "failed" and m["error"]["code"] == "restart_limit" and m["restarts"] == 3
    assert not marker.exists()
    assert not list((casruns_home / "queue").iterdir())


def _supervised(home: Path, rid: str) -> bool:
    from casruns.locking import is_held

    return is_held(str(home / "runs" / rid / "supervisor.lock"))


# -- every hook the supervisor calls is bounded (issue 14, item 8) ------------------------

SLOW_PLUGIN = """
import os, time
from casruns.plugins import hookimpl

WHICH = os.environ.get("CASRUNS_TEST_SLOWHOOK", "")  # the supervisor keeps CASRUNS_TEST_* variables

@hookimpl
def casruns_redaction(run):
    if WHICH == "redaction":
        time.sleep(120)
    return None

@hookimpl
def casruns_collect_artifacts(run, artifacts_dir):
    if WHICH == "collect":
        time.sleep(120)
    if WHICH == "collect-bad":
        return "../../etc"
    return None

@hookimpl
def casruns_status_changed(run_id, old, new, manifest):
    if WHICH == "status" and new == "running":
        time.sleep(120)
"""


@pytest.fixture
def slow_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "slowhooks.py").write_text(SLOW_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(site))

    def submit(which: str, *args: str) -> str:
        return json.loads(
            cli("--plugin", "slowhooks", "submit", "--json", *args, env={"CASRUNS_TEST_SLOWHOOK": which}, check=0).stdout
        )["run_id"]

    return submit


def test_a_redaction_hook_that_hangs_cannot_outlive_the_run_timeout(casruns_home, slow_plugin):
    rid = slow_plugin("redaction", "--timeout", "2s", "--", "true")
    final = wait_terminal(rid, timeout=30)  # the hook alone sleeps 120 s
    assert final["status"] == "timed_out" and final["error"]["code"] == "timeout", final
    assert "casruns_redaction" in final["error"]["message"]


def test_a_redaction_hook_that_hangs_is_abandoned_after_hook_timeout(casruns_home, slow_plugin):
    write_config(casruns_home, 'hook_timeout = "1s"\n')
    rid = slow_plugin("redaction", "--", "true")
    final = wait_terminal(rid, timeout=30)
    assert final["status"] == "failed" and final["error"]["code"] == "plugin_error", final
    assert final["error"]["hook"] == "casruns_redaction"


def test_a_collect_hook_that_hangs_is_abandoned_and_frees_the_slot(casruns_home, slow_plugin):
    write_config(casruns_home, 'hook_timeout = "1s"\nmax_running = 1\n')
    rid = slow_plugin("collect", "--", "sh", "-c", 'echo x > "$CASRUNS_ARTIFACTS_DIR/a"')
    final = wait_terminal(rid, timeout=30)
    assert final["status"] == "failed" and final["error"]["hook"] == "casruns_collect_artifacts", final
    assert final["artifacts"]["files"] == 1  # collected all the same
    nxt = json.loads(cli("submit", "--json", "--", "true", check=0).stdout)["run_id"]
    assert wait_terminal(nxt, timeout=30)["status"] == "succeeded"


def test_cancel_is_honoured_while_a_collect_hook_hangs(casruns_home, slow_plugin):
    rid = slow_plugin("collect", "--", "true")
    poll_until(lambda: status(rid)["status"] == "collecting_artifacts", what="collecting")
    cli("cancel", rid, check=0)
    final = wait_terminal(rid, timeout=20)  # hook_timeout is 30 s by default
    assert final["status"] == "cancelled", final


def test_a_blocking_status_hook_does_not_delay_the_timeout(casruns_home, slow_plugin):
    rid = slow_plugin("status", "--timeout", "2s", "--", "sleep", "60")
    final = wait_terminal(rid, timeout=30)
    assert final["status"] == "timed_out", final
    assert final["duration_s"] < 20


def test_a_collect_hook_returning_a_bare_string_is_a_plugin_error_that_keeps_the_artifacts(casruns_home, slow_plugin):
    rid = slow_plugin("collect-bad", "--", "sh", "-c", 'echo x > "$CASRUNS_ARTIFACTS_DIR/a"')
    final = wait_terminal(rid, timeout=30)
    assert final["status"] == "failed" and final["error"]["code"] == "plugin_error", final
    assert final["artifacts"]["files"] == 1
