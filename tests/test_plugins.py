"""Plugins: discovery, phases and processes, failure isolation, and the docs that keep them honest.

The sample provider in fixtures/casruns-fakesandbox is installed the way a user installs a
plugin (pip, into a directory on the Python path) and found through its entry point.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casruns import hookspecs
from casruns.errors import PluginError
from casruns.plugins import hookimpl
from conftest import cli, cli_json, poll_until

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("casruns_"))


@pytest.fixture(scope="session")
def fake_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(ROOT / "fixtures" / "casruns-fakesandbox")],
        check=True,
        capture_output=True,
    )
    return site


@pytest.fixture
def fake(fake_site, monkeypatch, tmp_path):
    """The environment a CLI call needs to see the sample plugin, plus its call log."""
    monkeypatch.setenv("PYTHONPATH", str(fake_site))
    log = tmp_path / "hooks.jsonl"
    return {"log": log, "label": f"fake.log={log}"}


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def submit_fake(fake, *extra, cmd=("sh", "-c", "echo in sandbox $FAKESANDBOX_ID")):
    proc, out = cli_json("submit", "--provider", "fakesandbox", "--label", fake["label"], *extra, "--", *cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out[0]["run_id"]


def python_prints(*lines: str) -> str:
    """The last line a fresh interpreter prints running ``lines`` (what it imported is its own)."""
    code = "\n".join(lines) + "\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def status(rid):
    return cli_json("status", rid)[1][0]


# -- the docs and tests that keep plugins honest (datasette's habit) -----------------------------


def test_every_hook_is_documented_in_the_plugin_guide():
    guide = (ROOT / "spec" / "plugins.md").read_text()
    missing = [h for h in HOOKS if f"### `{h}`" not in guide]
    assert missing == []


def test_every_hook_has_a_test():
    source = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert [h for h in HOOKS if f"def test_hook_{h}(" not in source] == []


def test_every_hookspec_docstring_names_its_process():
    for h in HOOKS:
        doc = getattr(hookspecs, h).__doc__
        assert re.search(r"Called by the (supervisor|CLI)", doc), h


def undocumented(spec) -> list[str]:
    """What a hookspec's docstring leaves out, in pytest's shape: a ``:param NAME:`` line for each
    argument, and a ``:return:`` line unless the hook returns None."""
    doc = spec.__doc__ or ""
    sig = inspect.signature(spec)
    missing = [f":param {p}:" for p in sig.parameters if not re.search(rf"^\s*:param {p}:", doc, re.M)]
    if sig.return_annotation not in ("None", None) and not re.search(r"^\s*:return:", doc, re.M):
        missing.append(":return:")
    return missing


def test_every_hook_argument_and_result_is_documented():
    assert {h: undocumented(getattr(hookspecs, h)) for h in HOOKS} == {h: [] for h in HOOKS}


def test_the_docstring_check_finds_a_missing_param():
    def casruns_example(run, extra) -> dict | None:
        """Called by the CLI.

        :param run: the run.
        """

    assert undocumented(casruns_example) == [":param extra:", ":return:"]


def test_gc_asks_for_roots_once_after_old_trash_and_before_removing_any_run_or_blob(registry):
    """What the casruns_gc_roots docstring promises, observed from inside the hook."""
    from test_gc import config, finished_run, make_old

    config(registry, '[retention]\nsucceeded = "0s"\n')
    rid = finished_run(registry, files={"a.txt": b"eligible"})
    garbage = registry.store.put_bytes(b"nothing references this").address
    make_old(registry)
    trash = Path(registry.runs_dir) / ".trash-left-by-a-killed-gc"

    class Probe:
        def __init__(self, fail=False):
            self.seen, self.fail = [], fail

        @hookimpl
        def casruns_gc_roots(self, registry_root):
            self.seen.append((registry.run_dir(rid).exists(), registry.store.contains(garbage), trash.exists()))
            if self.fail:
                raise RuntimeError("roots service down")

    for fail, dry_run in ((True, False), (False, True), (False, False)):
        trash.mkdir(exist_ok=True)
        probe = Probe(fail)
        registry.plugins.register(probe, f"probe-{fail}-{dry_run}", "module")
        try:
            registry.gc(dry_run=dry_run)
        except PluginError as e:
            assert fail and e.details == {"plugin": "probe-True-False", "hook": "casruns_gc_roots"}
        finally:
            registry.plugins.pm.unregister(probe)
        assert probe.seen == [(True, True, dry_run)]  # once; the run and the blob still there, old trash gone
        assert registry.run_dir(rid).exists() == registry.store.contains(garbage) == (fail or dry_run)


def test_run_context_lives_with_the_hook_specs_and_the_old_name_still_works():
    from casruns import plugins

    assert plugins.RunContext is hookspecs.RunContext
    assert hookspecs.RunContext.__module__ == "casruns.hookspecs"


def test_hookspecs_import_nothing_of_casruns_at_run_time():
    """Annotation-only imports stay under TYPE_CHECKING: the spec module costs pluggy and nothing else."""
    out = python_prints(
        "import sys, casruns",
        "before = set(sys.modules)",
        "import casruns.hookspecs",
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('casruns')))",
    )
    assert out == "['casruns.hookspecs']"


# -- discovery ----------------------------------------------------------------------------------


def test_plugins_json_lists_builtins_and_the_installed_plugin(fake, validate):
    proc, out = cli_json("plugins")
    assert proc.returncode == 0
    doc = validate(out[0], "plugins.schema.json")
    by_name = {p["name"]: p for p in doc["plugins"]}
    assert by_name["shell"]["providers"] == ["shell"] and by_name["shell"]["source"].startswith("entry point")
    assert "casruns_redaction" in by_name["redact"]["hooks"]
    fake_info = by_name["fakesandbox"]
    assert fake_info["providers"] == ["fakesandbox"]
    assert fake_info["source"] == "entry point (casruns-fakesandbox 1.0.0)"
    assert set(fake_info["hooks"]) == set(HOOKS)


def test_plugin_option_and_env_load_a_module(tmp_path, monkeypatch, validate):
    (tmp_path / "myplug.py").write_text(
        "from casruns.plugins import hookimpl\n@hookimpl\ndef casruns_providers():\n    return ['mine']\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    _, out = cli_json("plugins")
    assert "myplug" not in {p["name"] for p in out[0]["plugins"]}
    proc = cli("--plugin", "myplug", "plugins", "--json", check=0)
    doc = validate(json.loads(proc.stdout), "plugins.schema.json")
    assert {p["name"]: p["source"] for p in doc["plugins"]}["myplug"] == "module"
    _, out = cli_json("plugins", env={"CASRUNS_PLUGINS": "myplug"})
    assert "mine" in {prov for p in out[0]["plugins"] for prov in p["providers"]}


def test_missing_plugin_module_is_one_clear_error(casruns_home):
    proc = cli("--plugin", "no_such_plugin_module", "plugins")
    assert proc.returncode == 8
    assert proc.stderr.strip().count("\n") == 0 and "no_such_plugin_module" in proc.stderr


def test_unknown_provider_is_refused_before_the_run_exists(casruns_home):
    proc, out = cli_json("submit", "--provider", "wp-codebox", "--", "true")
    assert proc.returncode == 3 and out[0]["error"]["code"] == "unknown_provider"
    assert "shell" in out[0]["error"]["message"]
    assert not (casruns_home / "runs").exists() or not any((casruns_home / "runs").iterdir())


def test_status_and_list_never_load_plugins():
    out = python_prints(
        "import sys, casruns.cli.fast as f",
        "f.try_run(['list', '--json'])",
        "bad = [m for m in ('pluggy', 'click', 'zstandard', 'blake3', 'casruns.plugins') if m in sys.modules]",
        "print('loaded:' + ','.join(bad))",
    )
    assert out == "loaded:"


# -- tracing -----------------------------------------------------------------------------------

TRACE = re.compile(r"^casruns trace: (?P<plugin>\S+) (?P<hook>casruns_\w+) \d+\.\d{3}ms (?P<outcome>returned \w+|raised \w+)$")


def traces(text: str) -> list[tuple[str, str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("casruns trace:")]
    assert all(TRACE.match(line) for line in lines), lines
    return [(m["plugin"], m["hook"], m["outcome"]) for m in map(TRACE.match, lines)]


def test_trace_plugins_prints_every_hook_call_in_the_cli_and_the_supervisor(fake, casruns_home):
    secret = "label-secret-value-42"
    trace = {"CASRUNS_TRACE_PLUGINS": "1"}
    proc, out = cli_json("submit", "--provider", "fakesandbox", "--label", fake["label"], "--label", "fake.notify=crash",
                         "--label", f"note={secret}", "--", "sh", "-c", 'echo "key=$FAKESANDBOX_KEY"', env=trace)
    assert proc.returncode == 0, proc.stderr
    rid = out[0]["run_id"]
    # the CLI: submit asks every plugin for its providers
    assert ("fakesandbox", "casruns_providers", "returned list") in traces(proc.stderr)
    assert {p for p, h, _ in traces(proc.stderr) if h == "casruns_providers"} == {"shell", "fakesandbox"}
    assert cli("wait", rid, "--timeout", "30").returncode == 0
    log = casruns_home / "runs" / rid / "supervisor.log"
    # the supervisor: run hooks through call(), status changes through notify() (on their own thread)
    poll_until(lambda: sum(h == "casruns_status_changed" for _, h, _ in traces(log.read_text())) == 4, what="4 traced notifications")
    seen = traces(log.read_text())
    assert ("fakesandbox", "casruns_redaction", "returned dict") in seen
    assert ("redact", "casruns_redaction", "returned dict") in seen
    assert ("fakesandbox", "casruns_boot", "returned dict") in seen and ("shell", "casruns_boot", "returned None") in seen
    assert ("fakesandbox", "casruns_collect_artifacts", "returned list") in seen
    assert ("fakesandbox", "casruns_teardown", "returned None") in seen
    assert [o for p, h, o in seen if h == "casruns_status_changed"] == ["raised RuntimeError"] * 4
    # names and outcomes only: no argument or result value reaches the log
    text = log.read_text()
    traced = "\n".join(line for line in text.splitlines() if line.startswith("casruns trace:"))
    for value in (secret, "fake-sandbox-key-123456", "runtime-token-abcdef", f"fake-{rid}", "notification endpoint down"):
        assert value not in traced, value
    # the CLI again: gc asks for roots; without the variable nothing is traced
    assert ("fakesandbox", "casruns_gc_roots", "returned None") in traces(cli("gc", env=trace, check=0).stderr)
    assert traces(cli("gc", check=0).stderr) == []


def test_trace_plugins_names_the_exception_type_of_a_failing_hook_and_nothing_more(fake, casruns_home):
    cli("init", check=0)
    (casruns_home / "fakesandbox-roots.txt").mkdir()  # the sample plugin's open() raises IsADirectoryError
    proc = cli("gc", env={"CASRUNS_TRACE_PLUGINS": "1"})
    assert proc.returncode == 8
    assert traces(proc.stderr) == [("fakesandbox", "casruns_gc_roots", "raised IsADirectoryError")]
    assert [l for l in proc.stderr.splitlines() if not l.startswith("casruns trace:")] == [
        l for l in cli("gc").stderr.splitlines()
    ]  # the error line is the same with or without tracing; the path it names is not in the trace


# -- one test per hook ---------------------------------------------------------------------------


def test_hook_casruns_providers(fake):
    rid = submit_fake(fake)
    assert cli("wait", rid, "--timeout", "30").returncode == 0
    assert status(rid)["provider"] == "fakesandbox"


def test_hook_casruns_boot(fake, casruns_home):
    rid = submit_fake(fake)
    assert cli("wait", rid, "--timeout", "30").returncode == 0
    rec = status(rid)
    assert rec["runtime"]["id"] == f"fake-{rid}" and rec["runtime"]["version"] == "1.2.3"
    assert rec["runtime"]["api_token"] == "[REDACTED]"  # a key that names a secret
    assert rec["preview"]["url"] == f"http://127.0.0.1:9/preview/{rid}"
    assert cli("logs", rid).stdout == f"in sandbox fake-{rid}\n"  # boot's env reached the command
    log = calls(fake["log"])
    boot = [c for c in log if c["hook"] == "casruns_boot"]
    sup_pid = json.loads((casruns_home / "runs" / rid / "manifest.json").read_text())["manifest"]["supervisor"]["pid"]
    assert boot and boot[0]["pid"] == sup_pid and boot[0]["status"] == "booting"


def test_hook_casruns_teardown(fake):
    ok = submit_fake(fake)
    failing = submit_fake(fake, cmd=("sh", "-c", "exit 4"))
    slow = submit_fake(fake, "--timeout", "1", cmd=("sleep", "30"))
    cli("wait", ok, failing, slow, "--timeout", "40")
    outcomes = {c["outcome"]["status"] for c in calls(fake["log"]) if c["hook"] == "casruns_teardown"}
    assert outcomes == {"succeeded", "failed", "timed_out"}
    assert status(failing)["status"] == "failed" and status(slow)["status"] == "timed_out"


def test_hook_casruns_teardown_failure_does_not_hide_the_result(fake, casruns_home):
    import tomllib

    rid = submit_fake(fake, "--label", "fake.teardown=crash")
    assert cli("wait", rid, "--timeout", "30").returncode == 0
    assert status(rid)["status"] == "succeeded"
    m = tomllib.loads((casruns_home / "runs" / rid / "manifest.toml").read_text())
    assert m["teardown"]["ok"] is False and m["teardown"]["plugin"] == "fakesandbox"
    assert "sandbox teardown failed" in m["teardown"]["message"]


def test_hook_casruns_redaction(fake):
    rid = submit_fake(fake, cmd=("sh", "-c", 'echo "key=$FAKESANDBOX_KEY"'))
    cli("wait", rid, "--timeout", "30", check=0)
    out = cli("logs", rid).stdout
    assert "fake-sandbox-key-123456" not in out and "[REDACTED:FAKE_SANDBOX_KEY]" in out


def test_hook_casruns_collect_artifacts(fake):
    rid = submit_fake(fake, cmd=("sh", "-c", 'echo keep > "$CASRUNS_ARTIFACTS_DIR/keep.txt"; echo x > "$CASRUNS_ARTIFACTS_DIR/scratch.tmp"'))
    cli("wait", rid, "--timeout", "30", check=0)
    _, out = cli_json("artifacts", rid)
    assert sorted(e["path"] for e in out[0]["entries"]) == ["fakesandbox/summary.txt", "keep.txt"]


def test_hook_casruns_status_changed(fake):
    rid = submit_fake(fake, "--label", "fake.notify=crash")  # a failing notifier changes nothing
    assert cli("wait", rid, "--timeout", "30").returncode == 0
    seen = [(c["old"], c["new"]) for c in calls(fake["log"]) if c["hook"] == "casruns_status_changed"]
    assert seen == [("queued", "booting"), ("booting", "running"), ("running", "collecting_artifacts"), ("collecting_artifacts", "succeeded")]
    assert status(rid)["status"] == "succeeded"


def test_hook_casruns_promote(fake, casruns_home):
    ok = submit_fake(fake)
    vetoed = submit_fake(fake, "--label", "fake.veto=evidence incomplete")
    cli("wait", ok, vetoed, "--timeout", "30", check=0)
    proc, out = cli_json("promote", ok, "--reason", "tests pass", "--by", "homeboy")
    assert proc.returncode == 0 and out[0]["outcome"] == "promoted"
    entry = out[0]["run"]["retention"]["history"][-1]
    assert entry["metadata"] == {"sandbox": f"fake-{ok}"} and entry["by"] == "homeboy"
    promote_calls = [c for c in calls(fake["log"]) if c["hook"] == "casruns_promote"]
    assert promote_calls[0]["pid"] != json.loads((casruns_home / "runs" / ok / "manifest.json").read_text())["manifest"]["supervisor"]["pid"]
    before = (casruns_home / "runs" / vetoed / "manifest.toml").read_bytes()
    proc, out = cli_json("promote", vetoed, "--reason", "looks fine")
    assert proc.returncode == 8 and out[0]["error"]["code"] == "plugin_error"
    assert "evidence incomplete" in out[0]["error"]["message"]
    proc = cli("promote", vetoed, "--reason", "looks fine")
    assert "evidence incomplete" in proc.stderr and proc.stderr.count("\n") == 1
    assert (casruns_home / "runs" / vetoed / "manifest.toml").read_bytes() == before


def test_hook_casruns_gc_roots(fake, casruns_home):
    from casruns import Registry

    cli("init", check=0)
    (casruns_home / "config.toml").write_text('gc_grace = "0s"\n')
    reg = Registry(casruns_home)
    keep = reg.store.put_bytes(b"a sandbox snapshot a plugin still needs")
    drop = reg.store.put_bytes(b"garbage")
    (casruns_home / "fakesandbox-roots.txt").write_text(keep.address + "\n")
    proc, out = cli_json("gc")
    assert proc.returncode == 0 and out[0]["blobs_removed"] == 1
    assert reg.store.contains(keep.address) and not reg.store.contains(drop.address)
    (casruns_home / "fakesandbox-roots.txt").unlink()
    cli("gc", check=0)
    assert not reg.store.contains(keep.address)


# -- failure isolation -------------------------------------------------------------------------


def test_crashing_boot_ends_the_run_failed_and_still_tears_down(fake):
    rid = submit_fake(fake, "--label", "fake.boot=crash")
    assert cli("wait", rid, "--timeout", "30").returncode == 10
    rec = status(rid)
    assert rec["status"] == "failed"
    assert rec["error"]["code"] == "plugin_error"
    assert rec["error"]["plugin"] == "fakesandbox" and rec["error"]["hook"] == "casruns_boot"
    assert "sandbox refused to boot" in rec["error"]["message"]
    assert [c["hook"] for c in calls(fake["log"]) if c["hook"] == "casruns_teardown"] == ["casruns_teardown"]


def test_hanging_boot_is_bounded_by_the_timeout(fake):
    t0 = time.monotonic()
    rid = submit_fake(fake, "--label", "fake.boot=hang", "--timeout", "2s")
    assert cli("wait", rid, "--timeout", "30").returncode == 11
    assert time.monotonic() - t0 < 25
    rec = status(rid)
    assert rec["status"] == "timed_out" and "booting" in rec["error"]["message"]
    assert any(c["hook"] == "casruns_teardown" for c in calls(fake["log"]))


def test_crashing_artifact_hook_fails_the_run_but_keeps_logs(fake):
    rid = submit_fake(fake, "--label", "fake.artifacts=crash")
    assert cli("wait", rid, "--timeout", "30").returncode == 10
    rec = status(rid)
    assert rec["error"]["code"] == "plugin_error" and rec["error"]["hook"] == "casruns_collect_artifacts"
    assert cli("logs", rid).stdout == f"in sandbox fake-{rid}\n"


def test_hook_casruns_archive_backends(fake, tmp_path, validate):
    """A plugin's scheme works end to end in every archive command, through the real CLI."""
    other, box = {"CASRUNS_HOME": str(tmp_path / "B")}, tmp_path / "box"
    url = f"fakebox://{box}"
    rid = submit_fake(fake)
    assert cli("wait", rid, "--timeout", "30").returncode == 0
    proc, out = cli_json("archive", "push", url, rid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert validate(out[0], "reports.schema.json#/$defs/archive_push")["runs"] == 1
    assert (box / "casruns-archive.toml").is_file() and (box / "runs" / rid / "manifest.toml").is_file()
    _, out = cli_json("archive", "list", url, env=other)
    assert [r["run_id"] for r in out[0]["runs"]] == [rid]
    proc, out = cli_json("archive", "pull", url, env=other)
    assert proc.returncode == 0 and out[0]["runs"] == 1, proc.stdout
    assert cli("logs", rid, env=other).stdout == f"in sandbox fake-{rid}\n"
    assert cli("verify", "--against", url, rid, env=other).returncode == 0
    # without the plugin the scheme is unknown, to fsspec too
    proc, out = cli_json("archive", "list", url, env={**other, "CASRUNS_LOAD_PLUGINS": "shell"})
    assert proc.returncode == 3 and out[0]["error"]["code"] == "backend_missing"
