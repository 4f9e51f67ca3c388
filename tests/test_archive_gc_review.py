"""Hostile review of the fleet archive's retention and gc (issue 18, spec/archive-gc.md).

Each test proves a defect: it is marked xfail(strict=True) so the branch stays green; the fix
removes the mark. Directory archives unless S3 semantics matter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import unittest.mock as um

import pytest

from casruns import Registry
from casruns import archiveproto as proto
from casruns.archive import blob_key, manifest_key, open_remote
from conftest import cli, poll_until

from test_archive_gc import archived_blobs, archived_runs, blobs_of, dangling, finished


def conf(reg, dest, *sets):
    return reg.archive_config(dest, list(sets), [])


# ---- retention: what the archive's expiry must respect ----------------------------------------


@pytest.mark.xfail(strict=True, reason="_expired ignores retain_until/retain_for of a promoted run: "
                   "retention.promoted expires it earlier than its own retention says")
def test_a_promoted_runs_own_retain_until_keeps_it_past_retention_promoted(registry, tmp_path):
    """spec: 'A run's own retain_for/retain_until can only keep it longer in an archive, never
    shorter.' A promoted run kept --until 2099 must outlive retention.promoted=1s."""
    dest = str(tmp_path / "archive")
    a = finished(registry, "keepme", promote=True)
    registry.retain(a, until="2099-01-01T00:00:00Z")
    registry.archive_push(dest, [a])
    conf(registry, dest, "retention.promoted=1s", "retention.succeeded=1s")
    time.sleep(1.2)
    r = registry.archive_gc(dest)
    assert r["runs_removed"] == [], r["runs_removed"]
    assert archived_runs(open_remote(dest, registry)) == {a}


@pytest.mark.xfail(strict=True, reason="merge ranks records by event_seq, a per-registry counter (a pulled copy restarts "
                   "at 1): a pulled copy's retain --until is silently dropped and gc expires the run early")
def test_a_merge_never_drops_another_machines_retain_until(registry, tmp_path):
    dest = str(tmp_path / "archive")
    a = finished(registry, "fleetkeep")
    registry.archive_push(dest, [a])
    other = Registry(str(tmp_path / "other"))
    other.archive_pull(dest, [a])
    # machine B (a pulled copy: its event_seq restarts low) keeps the run until 2099 and pushes that
    other.retain(a, until="2099-01-01T00:00:00Z")
    rep = other.archive_push(dest, [a])
    rec = registry.archive_record(dest, a)
    conf(registry, dest, "retention.succeeded=1s")
    time.sleep(1.2)
    r = registry.archive_gc(dest)
    assert rec["retention"].get("retain_until"), (rep, rec["retention"])
    assert r["runs_removed"] == [] and archived_runs(open_remote(dest, registry)) == {a}
