"""``status``/``list --format homeboy``: Homeboy's ``homeboy/run-lifecycle-record/v1`` (spec/homeboy.md).

Real CLI output for runs in every status is validated against the schema written from Homeboy's
field list (tests/schemas/), and the mapped values are checked per status; the mapping of
records no quick run produces (booting, collecting_artifacts, collection_pending) and of events
is checked on the pure functions.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from casruns import homeboy
from conftest import cli, poll_until

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "homeboy-run-lifecycle-record.v1.schema.json").read_text())
ARTIFACT = 'mkdir -p "$CASRUNS_ARTIFACTS_DIR" && echo out > "$CASRUNS_ARTIFACTS_DIR/result.txt"'


def check(doc: dict) -> dict:
    import jsonschema

    cls = jsonschema.validators.validator_for(SCHEMA)
    cls.check_schema(SCHEMA)
    cls(SCHEMA, format_checker=cls.FORMAT_CHECKER).validate(doc)
    return doc


def homeboy_status(*ids: str, env=None) -> list[dict]:
    proc = cli("status", "--format", "homeboy", *ids, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    return [check(json.loads(line)) for line in proc.stdout.splitlines()]


def one(rid: str) -> dict:
    (doc,) = homeboy_status(rid)
    return doc


def provider(doc: dict) -> dict:
    (entry,) = doc["provider_runtime"]
    return entry


def casruns_id(rid: str) -> dict:
    return {"kind": "casruns_run_id", "value": rid, "provider": "casruns"}


@pytest.fixture
def finished(registry):
    """One finished run of each kind, run side by side (the registry allows 4 at a time)."""
    cases = {
        "succeeded_artifacts": (["sh", "-c", ARTIFACT], {}),
        "succeeded_bare": (["true"], {}),
        "failed_artifacts": (["sh", "-c", ARTIFACT + "; exit 3"], {}),
        "failed_bare": (["sh", "-c", "exit 4"], {}),
        "timed_out": (["sleep", "30"], {"timeout": 0.5}),
        "timed_out_artifacts": (["sh", "-c", ARTIFACT + "; sleep 30"], {"timeout": 1.0}),
    }
    ids = {name: registry.submit(argv, labels={"case": name}, **kw)["run_id"] for name, (argv, kw) in cases.items()}
    for rid in ids.values():
        poll_until(lambda: registry.get(rid)["terminal"], timeout=60, what="the run to end")
    registry.promote(ids["succeeded_artifacts"], reason="the good build")
    return ids


def test_terminal_runs_map_per_status(registry, finished):
    ids = finished
    docs = dict(zip(ids, homeboy_status(*ids.values())))  # one record per id, in argument order
    for name, doc in docs.items():
        rid = ids[name]
        record = registry.get(rid)
        assert doc["schema"] == "homeboy/run-lifecycle-record/v1"
        assert doc["execution"]["started_at"] == record["started_at"]
        assert doc["execution"]["finished_at"] == record["finished_at"]
        assert doc["execution"]["updated_at"] == doc["updated_at"] == record["updated_at"]
        entry = provider(doc)
        assert entry["task_id"] == rid and entry["backend"] == "shell"
        assert entry["stream_uri"] == f"casruns://runs/{rid}/logs/transcript"
        assert entry["external_runtime_ids"] == doc["external_runtime_ids"] == [casruns_id(rid)]
        meta = entry["metadata"]
        assert meta["casruns_status"] == record["status"] and meta["labels"] == {"case": name}
        assert meta["attempt"] == 1 and meta["exit_code"] == record["exit_code"] and meta["error"] == record["error"]
        assert meta["follow_command"] == f"casruns logs --stream transcript --follow {rid}"
        assert doc["heartbeat"] == {"last_seen_at": record["heartbeat_at"]}  # no staleness once terminal
        assert doc["cleanup"] == {"state": "succeeded", "policy": homeboy.CLEANUP_POLICY, "updated_at": record["finished_at"]}
        assert doc["finalization"] == {"state": "not_requested"}
    expect = {  # name: (execution, provider, artifact retention, resumable)
        "succeeded_artifacts": ("succeeded", "succeeded", "retained", False),
        "succeeded_bare": ("succeeded", "succeeded", "not_applicable", False),
        "failed_artifacts": ("partial_recoverable", "failed", "retained", True),
        "failed_bare": ("failed", "failed", "not_applicable", True),
        "timed_out": ("failed", "timed_out", "not_applicable", True),
        "timed_out_artifacts": ("partial_recoverable", "timed_out", "retained", True),
    }
    for name, (execution, state, retention, resumable) in expect.items():
        doc = docs[name]
        assert (doc["execution"]["state"], provider(doc)["state"], doc["artifact_retention"]["status"]) == (execution, state, retention), name
        meta = provider(doc)["metadata"]
        assert meta["resumable"] is resumable and ("resume_command" in meta) is resumable
    promoted = docs["succeeded_artifacts"]["artifact_retention"]
    record = registry.get(ids["succeeded_artifacts"])
    assert promoted == {"status": "retained", "policy": "promoted", "updated_at": record["retention"]["promoted_at"]}
    kept = docs["failed_artifacts"]["artifact_retention"]
    record = registry.get(ids["failed_artifacts"])
    assert kept == {"status": "retained", "policy": f"status:failed until {record['retention']['retain_until']}", "updated_at": record["finished_at"]}
    assert provider(docs["timed_out"])["metadata"]["error"]["code"] == "timeout"


def test_queued_and_cancelled_runs(registry):
    queued = registry.submit(["true"], spawn=False)["run_id"]
    doc = one(queued)
    assert doc["execution"] == {"state": "queued", "updated_at": registry.get(queued)["updated_at"]}
    assert provider(doc)["state"] == "not_started"
    assert "stale_after_seconds" not in doc.get("heartbeat", {})  # Homeboy judges staleness of running records only
    assert doc["cleanup"]["state"] == "pending" and doc["artifact_retention"] == {"status": "pending", "policy": "active"}
    registry.cancel(queued, reason="not needed")
    doc = one(queued)
    record = registry.get(queued)
    assert doc["execution"] == {"state": "cancelled", "finished_at": record["finished_at"], "updated_at": record["updated_at"]}
    assert provider(doc)["state"] == "cancelled"
    assert "stream_uri" not in provider(doc)  # it never ran: no log to follow
    assert doc["artifact_retention"]["status"] == "not_applicable"
    assert doc["cleanup"]["state"] == "succeeded"


def test_running_then_cancelled(registry):
    rid = registry.submit(["sh", "-c", ARTIFACT + "; sleep 30"])["run_id"]
    poll_until(lambda: registry.get(rid)["status"] == "running" and registry.get(rid)["heartbeat_at"], what="the run to run")
    doc = one(rid)
    assert doc["execution"]["state"] == "running" and "finished_at" not in doc["execution"]
    assert provider(doc)["state"] == "running"
    assert doc["heartbeat"]["stale_after_seconds"] == 30  # the registry's lost_after, rounded up
    assert doc["heartbeat"]["last_seen_at"] <= registry.get(rid)["heartbeat_at"]  # the heartbeat file's mtime
    assert doc["cleanup"]["state"] == "pending" and doc["artifact_retention"]["status"] == "pending"
    registry.cancel(rid, reason="enough")
    poll_until(lambda: registry.get(rid)["terminal"], what="the cancel")
    doc = one(rid)
    # a cancel is the operator's decision: cancelled, even though its artifacts were kept and it is resumable
    assert (doc["execution"]["state"], provider(doc)["state"]) == ("cancelled", "cancelled")
    assert doc["artifact_retention"]["status"] == "retained" and provider(doc)["metadata"]["resumable"] is True


def test_list_format_homeboy_is_one_record_per_line_on_both_paths(registry, finished):
    plain = cli("list", "--format", "homeboy", check=0)
    docs = [check(json.loads(line)) for line in plain.stdout.splitlines()]
    listed = [r["run_id"] for r in registry.list()]
    assert [provider(d)["task_id"] for d in docs] == listed  # newest first, as list
    for args in (["list", "--format", "homeboy"], ["list", "--format=homeboy", "--json", "--status", "failed"],
                 ["status", "--format", "homeboy", listed[0], "missing"], ["status", listed[1], "--format", "homeboy", "--json", "missing"]):
        fast, slow = cli(*args), cli(*args, env={"CASRUNS_NO_FASTPATH": "1"})
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), args
    assert cli("list", "--format", "homeboy", "--json").stdout == plain.stdout  # --json only changes errors
    failed = cli("list", "--format", "homeboy", "--status", "failed", check=0).stdout.splitlines()
    assert {json.loads(l)["execution"]["state"] for l in failed} == {"failed", "partial_recoverable"}
    chain = cli("list", "--format", "homeboy", "--chain", listed[0], check=0).stdout.splitlines()
    assert [provider(json.loads(l))["task_id"] for l in chain] == [listed[0]]


def test_errors_keep_the_conventions(registry):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    proc = cli("status", "--format", "homeboy", rid, "missing", "--json")
    first, err = (json.loads(l) for l in proc.stdout.splitlines())
    assert proc.returncode == 4 and provider(check(first))["task_id"] == rid
    assert err["schema"] == "casruns/error/v1" and err["error"]["code"] == "run_not_found"
    proc = cli("status", "--format", "homeboy", "missing")
    assert (proc.returncode, proc.stdout) == (4, "") and proc.stderr.startswith("casruns: error: ")
    for env in ({}, {"CASRUNS_NO_FASTPATH": "1"}):
        proc = cli("status", "--format", "yaml", rid, "--json", env=env)
        assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "usage"
    # an unreadable manifest: the other runs are printed, an error line per bad run, exit 6
    path = registry.run_dir(rid).manifest_path
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join([lines[1], 'labels = "not a table"', *[l for l in lines[2:] if not l.startswith("labels")]]) + "\n")
    good = registry.submit(["true"], spawn=False)["run_id"]
    for env in ({}, {"CASRUNS_NO_FASTPATH": "1"}):
        proc = cli("list", "--format", "homeboy", "--json", env=env)
        docs = [json.loads(l) for l in proc.stdout.splitlines()]
        assert proc.returncode == 6 and provider(check(docs[0]))["task_id"] == good
        assert docs[1]["schema"] == "casruns/error/v1" and docs[1]["error"]["details"] == {"run_id": rid}
        assert docs[1]["error"]["exit_code"] == 6
        proc = cli("list", "--format", "homeboy", env=env)
        assert proc.returncode == 6 and proc.stderr.startswith(f"casruns: error: run {rid}: ")


# -- the pure mapping: states no quick run shows ----------------------------------------------


@pytest.fixture
def record(registry):
    rid = registry.submit(["sh", "-c", ARTIFACT + "; exit 1"])["run_id"]
    poll_until(lambda: registry.get(rid)["terminal"], what="the run to end")
    return registry.get(rid)


def active(record: dict, status: str) -> dict:
    r = copy.deepcopy(record)
    r.update(status=status, terminal=False, finished_at=None, artifacts=None, exit_code=None, error=None)
    r["logs"] = {"stdout": None, "stderr": None, "transcript": None}
    r["retention"].update(rule="active", retain_until=None)
    return r


@pytest.mark.parametrize("status", ["booting", "running", "collecting_artifacts"])
def test_active_statuses_are_running(record, status):
    doc = check(homeboy.from_record(active(record, status), stale_after_seconds=30))
    assert doc["execution"]["state"] == "running" and provider(doc)["state"] == "running"
    assert provider(doc)["metadata"]["casruns_status"] == status
    assert doc["heartbeat"]["stale_after_seconds"] == 30
    assert (doc["cleanup"]["state"], doc["artifact_retention"]["status"]) == ("pending", "pending")


def test_collection_pending_is_inferred_and_a_flag_is_believed(record):
    r = copy.deepcopy(record)
    r.update(artifacts=None, logs={"stdout": None, "stderr": None, "transcript": None})
    r["error"] = {"code": "no_space", "message": "the filesystem holding the registry is full"}
    doc = check(homeboy.from_record(r))
    assert doc["execution"]["state"] == "failed"  # nothing stored yet to resume from
    assert doc["cleanup"]["state"] == "pending" and doc["artifact_retention"]["status"] == "pending"
    assert provider(doc)["metadata"]["collection_pending"] is True
    r["collection_pending"] = False
    assert check(homeboy.from_record(r))["cleanup"]["state"] == "succeeded"
    r = copy.deepcopy(record)
    r.update(artifacts=None, error={"code": "collect_failed", "message": "cannot collect artifacts"})
    doc = check(homeboy.from_record(r))
    assert (doc["execution"]["state"], doc["artifact_retention"]["status"], doc["cleanup"]["state"]) == ("failed", "failed", "succeeded")


def test_unknown_status_and_provider_ids(record):
    r = copy.deepcopy(record)
    r.update(status="paused", provider=None, runtime={"id": "box-7", "kind": "vm"}, preview={"url": "https://box-7.example.test"})
    doc = check(homeboy.from_record(r))
    assert (doc["execution"]["state"], provider(doc)["state"], doc["cleanup"]["state"]) == ("unknown", "unknown", "unknown")
    assert doc["artifact_retention"]["status"] == "unknown" and provider(doc)["backend"] == "casruns"
    assert doc["external_runtime_ids"] == provider(doc)["external_runtime_ids"] == [
        casruns_id(r["run_id"]),
        {"kind": "provider_runtime_id", "value": "box-7", "provider": "casruns"},
        {"kind": "preview_url", "value": "https://box-7.example.test", "provider": "casruns", "url": "https://box-7.example.test"},
    ]


# -- events (casruns/event/v1, spec/homeboy.md "Events") ---------------------------------------


def event(type_: str, status: str, **kw) -> dict:
    run = {"status": status, "labels": {"suite": "unit"}, "provider": "shell", "attempt": 2, "promoted": False,
           "created_at": "2026-11-30T10:00:00.000000Z", "started_at": "2026-11-30T10:00:01.000000Z", "finished_at": None}
    if status in ("succeeded", "failed", "timed_out", "cancelled"):
        run["finished_at"] = "2026-11-30T10:05:00.000000Z"
    run.update(kw.pop("run", {}))
    ev = {"schema": "casruns/event/v1", "cursor": "0000000000004096", "run_id": "r1", "seq": 3, "type": type_,
          "time": "2026-11-30T10:05:00.123456Z", "old_status": None, "new_status": None, "exit_code": None,
          "error": None, "recovered": False, "run": run, "detail": {}}
    ev.update(kw)
    return ev


@pytest.mark.parametrize("type_, status, kw, expect", [
    ("created", "queued", {"run": {"started_at": None}}, ("queued", "not_started", "pending", "pending")),
    ("status", "running", {"old_status": "booting", "new_status": "running"}, ("running", "running", "pending", "pending")),
    ("status", "succeeded", {"exit_code": 0}, ("succeeded", "succeeded", "succeeded", "unknown")),
    ("status", "timed_out", {"error": {"code": "timeout", "message": "over"}}, ("failed", "timed_out", "succeeded", "unknown")),
    ("status", "failed", {"error": {"code": "no_space", "message": "full"}}, ("failed", "failed", "unknown", "unknown")),
    ("status", "cancelled", {"run": {"started_at": None}}, ("cancelled", "cancelled", "succeeded", "not_applicable")),
    ("promoted", "succeeded", {"run": {"promoted": True}}, ("succeeded", "succeeded", "succeeded", "retained")),
    ("salvaged", "failed", {"error": {"code": "supervisor_lost", "message": "gone"}}, ("failed", "failed", "succeeded", "unknown")),
    ("removed", "succeeded", {}, ("succeeded", "succeeded", "succeeded", "not_applicable")),
])
def test_events_map(type_, status, kw, expect):
    doc = check(homeboy.from_event(event(type_, status, **kw)))
    assert (doc["execution"]["state"], provider(doc)["state"], doc["cleanup"]["state"], doc["artifact_retention"]["status"]) == expect
    assert doc["updated_at"] == doc["execution"]["updated_at"] == "2026-11-30T10:05:00.123456Z"
    assert "heartbeat" not in doc and doc["finalization"] == {"state": "not_requested"}
    meta = provider(doc)["metadata"]
    assert meta["event"] == {"type": type_, "seq": 3, "cursor": "0000000000004096", "recovered": False}
    assert meta["labels"] == {"suite": "unit"} and meta["attempt"] == 2 and provider(doc)["backend"] == "shell"
    assert doc["external_runtime_ids"] == [casruns_id("r1")]
    assert ("stream_uri" in provider(doc)) is (type_ != "removed")
