"""The registry checked in under fixtures/ was written by casruns 0.1 (format 1, manifest v1).

It must keep loading: a change to the format that breaks old registries fails here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from casruns import Registry

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "registry-v1"


@pytest.fixture
def old_registry(tmp_path):
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    return Registry(root)


def test_old_registry_lists_and_reports_every_run(old_registry, validate):
    runs = {r["run_id"]: r for r in old_registry.list()}
    assert {k: v["status"] for k, v in runs.items()} == {
        "fixture-succeeded": "succeeded",
        "fixture-failed": "failed",
        "fixture-cancelled": "cancelled",
    }
    for r in runs.values():
        validate(r, "run.schema.json")
    assert runs["fixture-failed"]["exit_code"] == 2
    assert runs["fixture-cancelled"]["cancel"]["reason"] == "fixture cancel"
    assert runs["fixture-succeeded"]["labels"] == {"suite": "fixture", "branch": "main"}


def test_old_registry_logs_and_artifacts_read_back_verified(old_registry, tmp_path):
    assert b"".join(old_registry.log_chunks("fixture-succeeded", "stdout")) == b"fixture stdout\n"
    assert b"".join(old_registry.log_chunks("fixture-failed", "stderr")) == b"boom\n"
    transcript = b"".join(old_registry.log_chunks("fixture-succeeded", "transcript")).decode()
    assert [l.split(" ", 1)[1] for l in transcript.splitlines()] == ["stdout fixture stdout", "stderr fixture stderr"]
    tree = old_registry.tree("fixture-succeeded")
    assert [(e.path, e.type) for e in tree.entries] == [("latest.xml", "symlink"), ("reports/junit.xml", "file")]
    assert b"".join(old_registry.cat("fixture-succeeded", "reports/junit.xml")) == b'<testsuite tests="2"/>\n'
    report = old_registry.export("fixture-succeeded", str(tmp_path / "out"))
    assert report["files"] == 1 and report["symlinks"] == 1 and report["refused"] == []


def test_unknown_fields_in_an_old_manifest_survive_an_update(old_registry):
    run = old_registry.run_dir("fixture-failed")
    with run.update() as m:
        m["retention"]["retain_for"] = 86400.0
    again = run.read_fresh()
    assert again["future_scalar"] == "kept by older readers"
    assert again["future_table"] == {"note": "a field a newer casruns wrote"}
    assert again["retention"]["retain_for"] == 86400.0
