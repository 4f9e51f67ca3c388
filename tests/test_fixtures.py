"""The registries checked in under fixtures/: registry-v1 written by casruns 0.1 (format 1, manifest v1),
registry-v2 by casruns 0.2 (format 2: a pack).

It must keep loading: a change to the format that breaks old registries fails here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from casruns import Registry

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "registry-v1"


def copy_of(fixture: Path, dest: Path) -> Registry:
    """A writable copy: tests may write, the checked-in fixture never changes."""
    shutil.copytree(fixture, dest)
    return Registry(dest)


@pytest.fixture
def old_registry(tmp_path):
    return copy_of(FIXTURE, tmp_path / "old")


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


FIXTURE_V2 = Path(__file__).resolve().parent.parent / "fixtures" / "registry-v2"


@pytest.fixture
def v2_registry(tmp_path):
    return copy_of(FIXTURE_V2, tmp_path / "v2")


def test_format_2_registry_with_a_pack_reads_back_verified(v2_registry, validate):
    """Written by casruns 0.2: a run whose 20 artifacts and tree are in one pack, logs loose."""
    assert v2_registry.format_version == 2
    [rec] = v2_registry.list()
    validate(rec, "run.schema.json")
    assert rec["run_id"] == "fixture-packed" and rec["status"] == "succeeded" and rec["retention"]["promoted"]
    assert b"".join(v2_registry.log_chunks("fixture-packed", "stdout")) == b"packed stdout\n"
    store = v2_registry.store
    [pack] = store.pack_names()
    tree = v2_registry.tree("fixture-packed")
    assert len(tree.entries) == 20
    assert set(tree.addresses()) | {v2_registry.run_dir("fixture-packed").read()["artifacts"]["tree"]} == set(store.pack_index(pack))
    for i in range(1, 21):
        assert b"".join(v2_registry.cat("fixture-packed", f"reports/r{i}.txt")) == f"report {i} ok\n".encode()
    report = v2_registry.verify(read_data=True)
    assert report["ok"] and report["orphans"] == 0, report


def test_format_2_registry_is_refused_by_the_format_1_rule(v2_registry, monkeypatch):
    """What casruns 0.1 does with it: version 2 is above what it reads, so it stops."""
    from casruns import config
    from casruns.errors import UnsupportedFormat

    monkeypatch.setattr(config, "FORMAT_VERSION", 1)
    with pytest.raises(UnsupportedFormat):
        config.read_format(v2_registry.root)
