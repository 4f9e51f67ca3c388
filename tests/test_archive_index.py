"""The archive's index (issue 18): ``archive list`` reads summaries from ``index/`` segments
instead of one manifest per run, and never trusts an entry whose manifest version is not the
one the ``runs/`` listing shows. Against a directory and a real S3-compatible server (moto)."""

from __future__ import annotations

import json

import pytest

from casruns import archiveindex
from casruns.archive import _run_blobs, manifest_key, open_remote, remote_manifest
from casruns.remotes import FsspecRemote, LocalRemote
from test_archive import archive, s3_server  # noqa: F401 - the fixtures, shared

FILTERS = [{}, {"labels": {"suite": "unit"}}, {"statuses": ["cancelled"]}, {"promoted": True}, {"promoted": False},
           {"since": "1h"}, {"since": "2099-01-01T00:00:00Z"}, {"limit": 2}, {"statuses": ["succeeded"], "labels": {"suite": "e2e"}}]


@pytest.fixture(autouse=True)
def no_push_index(monkeypatch):
    """These tests stage the index themselves (index_runs); push's own segments are tested last."""
    import casruns.archive

    monkeypatch.setattr(casruns.archive, "INDEX_ON_PUSH", False)


@pytest.fixture
def reads(monkeypatch):
    """Every key opened on any remote, in order (a GET each)."""
    seen: list[str] = []
    for cls in (LocalRemote, FsspecRemote):
        original = cls.open

        def counting(self, key, _original=original):
            seen.append(key)
            return _original(self, key)

        monkeypatch.setattr(cls, "open", counting)
    original_get = FsspecRemote.get_bytes

    def counting_get(self, key, limit=None):
        if not self.renames:  # an object store reads with one GET, not through open()
            seen.append(key)
        return original_get(self, key, limit)

    monkeypatch.setattr(FsspecRemote, "get_bytes", counting_get)
    return seen


def manifest_reads(seen: list[str]) -> list[str]:
    return sorted(k.split("/")[1] for k in seen if k.startswith("runs/"))


def cancelled_runs(registry, n: int, promote=(), labels=None) -> list[str]:
    ids = []
    for i in range(n):
        rid = registry.submit(["true"], spawn=False, labels=labels or {"suite": "unit" if i % 2 else "e2e"})["run_id"]
        registry.cancel(rid)
        if i in promote:
            registry.promote(rid, reason="keep")
        ids.append(rid)
    return ids


def index_runs(registry, url: str, rids: list[str], machine: str = "m1") -> str | None:
    """What push will do after writing manifests: one segment with an entry per run."""
    remote = open_remote(url, registry)
    entries = []
    for rid in rids:
        m = remote_manifest(remote, rid)
        version = remote.stat(manifest_key(rid)).version
        entries.append(archiveindex.entry(rid, version, m, _run_blobs(registry, m), registry.config))
    return archiveindex.append(remote, machine, entries)


def segments(registry, url: str) -> list[str]:
    return sorted(o.key for o in open_remote(url, registry).objects("index"))


def test_indexed_runs_are_listed_without_reading_their_manifests(registry, archive, reads, validate):
    url = archive["url"]
    ids = cancelled_runs(registry, 4, promote=(1,))
    registry.archive_push(url, ids)
    before = {json.dumps(f, sort_keys=True): registry.archive_list(url, **f) for f in FILTERS}
    assert manifest_reads(reads) and index_runs(registry, url, ids)
    late = cancelled_runs(registry, 1, labels={"suite": "unit"})[0]
    registry.archive_push(url, [late])  # pushed after the index was written: no entry for it
    reads.clear()
    listing = validate(registry.archive_list(url), "reports.schema.json#/$defs/archive_list")
    assert manifest_reads(reads) == [late], "indexed runs must not be read"
    assert [k for k in reads if k.startswith("index/")] == segments(registry, url)  # one GET per segment
    assert {r["run_id"] for r in listing["runs"]} == set(ids + [late])
    # every filter gives what it gave without an index, plus the late run where it matches
    for f in FILTERS:
        after = registry.archive_list(url, **f)
        want = [r for r in before[json.dumps(f, sort_keys=True)]["runs"]]
        got = [r for r in after["runs"] if r["run_id"] != late]
        if f.get("limit"):
            assert after["runs"][0]["run_id"] == late and len(after["runs"]) == f["limit"]
            continue
        assert got == want, f


def test_results_are_identical_with_and_without_an_index(registry, archive):
    url = archive["url"]
    ids = cancelled_runs(registry, 3, promote=(0, 2))
    real = registry.submit(["sh", "-c", 'echo out; mkdir -p "$CASRUNS_ARTIFACTS_DIR/d"; printf x > "$CASRUNS_ARTIFACTS_DIR/d/f"'])["run_id"]
    registry.wait([real], timeout=60)
    ids.append(real)
    registry.archive_push(url, ids)
    plain = [registry.archive_list(url, **f) for f in FILTERS]
    index_runs(registry, url, ids)
    assert [registry.archive_list(url, **f) for f in FILTERS] == plain
    e = archiveindex.load(open_remote(url, registry)).entries[real]
    m = registry.run_dir(real).read_fresh()
    assert e["blobs"] == _run_blobs(registry, m) and len(e["blobs"]) >= 3  # logs, the tree, its file
    assert archiveindex.load(open_remote(url, registry), blobs=False).entries[real]["blobs"] == []


def test_a_manifest_rewritten_after_its_entry_is_read_fresh(registry, archive, reads):
    url = archive["url"]
    a, b = cancelled_runs(registry, 2)
    registry.archive_push(url, [a, b])
    index_runs(registry, url, [a, b])
    registry.promote(a, reason="later")  # another machine's push would rewrite it the same way
    registry.archive_push(url, [a])
    reads.clear()
    rows = {r["run_id"]: r for r in registry.archive_list(url)["runs"]}
    assert rows[a]["promoted"] is True and rows[b]["promoted"] is False
    assert manifest_reads(reads) == [a]
    assert [r["run_id"] for r in registry.archive_list(url, promoted=True)["runs"]] == [a]
    # a newer segment for the rewritten manifest is used again; the older entry is not
    index_runs(registry, url, [a], machine="m2")
    reads.clear()
    assert {r["run_id"]: r["promoted"] for r in registry.archive_list(url)["runs"]} == {a: True, b: False}
    assert manifest_reads(reads) == []


def test_a_corrupt_segment_or_line_is_skipped_and_the_run_read_from_its_manifest(registry, archive, reads):
    url = archive["url"]
    a, b, c = cancelled_runs(registry, 3, promote=(2,))
    registry.archive_push(url, [a, b, c])
    plain = registry.archive_list(url)
    remote = open_remote(url, registry)
    good = [archiveindex.entry(r, remote.stat(manifest_key(r)).version, remote_manifest(remote, r), [], registry.config) for r in (a, b, c)]
    bad_b = dict(good[1], summary={"status": "succeeded"})  # incomplete: must not be used
    lines = [json.dumps(good[0]), "{not json", json.dumps(bad_b), json.dumps({"schema": "other"}), json.dumps(good[2])[:40]]
    remote.put_bytes(("\n".join(lines) + "\n").encode(), "index/m1-0000000000000001-00000000.ndjson")
    remote.put_bytes(b"\xff\xfe\x00 garbage", "index/m2-0000000000000002-00000000.ndjson")
    remote.put_bytes(b"ignored: not a segment name", "index/README")
    index = archiveindex.load(remote)
    assert set(index.entries) == {a} and len(index.problems) == 5
    assert {p["segment"] for p in index.problems} == {"index/m1-0000000000000001-00000000.ndjson", "index/m2-0000000000000002-00000000.ndjson"}
    assert index.segments == ["index/m1-0000000000000001-00000000.ndjson", "index/m2-0000000000000002-00000000.ndjson"]
    reads.clear()
    assert registry.archive_list(url) == plain
    assert manifest_reads(reads) == sorted([b, c])
    # compaction drops the corrupt segment with the rest (the README is no segment: left alone)
    archiveindex.compact(remote, "gc", dict(index.entries), folded=index.segments)
    assert [k for k in segments(registry, url) if archiveindex.is_segment(k)] != [] and "index/README" in segments(registry, url)
    assert len(segments(registry, url)) == 2 and archiveindex.load(remote).problems == []


def test_a_run_whose_manifest_is_gone_is_not_listed_though_indexed(registry, archive):
    url = archive["url"]
    a, b = cancelled_runs(registry, 2)
    registry.archive_push(url, [a, b])
    index_runs(registry, url, [a, b])
    open_remote(url, registry).delete([manifest_key(a)])
    out = registry.archive_list(url)
    assert [r["run_id"] for r in out["runs"]] == [b] and "errors" not in out


def test_compact_folds_segments_into_one_and_keeps_a_segment_written_meanwhile(registry, archive, reads, monkeypatch):
    url = archive["url"]
    a, b, c, d = cancelled_runs(registry, 4, promote=(0,))
    registry.archive_push(url, [a, b, c])
    for rid in (a, b, c):
        index_runs(registry, url, [rid], machine=f"m-{rid[-4:]}")
    registry.archive_push(url, [d])
    remote = open_remote(url, registry)
    index = archiveindex.load(remote)
    assert len(index.segments) == 3 and set(index.entries) == {a, b, c}
    live = {rid: e for rid, e in index.entries.items() if rid != c}  # gc decided c is not current
    written = []
    real_append = archiveindex.append

    def append_then_push(remote_, machine, entries):
        key = real_append(remote_, machine, entries)
        monkeypatch.setattr(archiveindex, "append", real_append)
        written.append(index_runs(registry, url, [d], machine="pusher"))  # a push between gc's write and delete
        return key

    monkeypatch.setattr(archiveindex, "append", append_then_push)
    counts = archiveindex.compact(remote, "gc-host", live, folded=index.segments)
    assert counts["entries"] == 2 and counts["segments_deleted"] == 3
    assert segments(registry, url) == sorted([counts["segment"], written[0]])
    reads.clear()
    assert {r["run_id"] for r in registry.archive_list(url)["runs"]} == {a, b, c, d}
    assert manifest_reads(reads) == [c]  # dropped from the index: read; d: from the pusher's segment
    # without ``folded``: the segments listed before the write are the ones deleted
    index = archiveindex.load(remote)

    def delete_after_a_push(keys, _delete=remote.delete):
        written.append(index_runs(registry, url, [c], machine="pusher2"))
        _delete(keys)

    monkeypatch.setattr(remote, "delete", delete_after_a_push)
    counts = archiveindex.compact(remote, "gc-host", dict(index.entries))
    assert counts["segments_deleted"] == 2
    assert segments(registry, url) == sorted([counts["segment"], written[1]])
    assert set(archiveindex.load(remote).entries) == {a, b, c, d}


def test_append_writes_nothing_for_no_entries_and_refuses_a_bad_entry(registry, archive):
    url = archive["url"]
    (a,) = cancelled_runs(registry, 1)
    registry.archive_push(url, [a])
    remote = open_remote(url, registry)
    assert archiveindex.append(remote, "m", []) is None and segments(registry, url) == []
    with pytest.raises(ValueError):
        archiveindex.append(remote, "m", [{"schema": archiveindex.SCHEMA, "run_id": a}])
    key = archiveindex.append(remote, "host name/with:odd chars", [archiveindex.entry(a, "v1", remote_manifest(remote, a), [], registry.config)])
    assert archiveindex.is_segment(key) and key.startswith("index/host_name_with_odd_chars-")


def test_push_indexes_what_it_pushed_and_gc_compacts_it(registry, archive, reads, monkeypatch):
    import casruns.archive

    monkeypatch.setattr(casruns.archive, "INDEX_ON_PUSH", True)
    url = archive["url"]
    ids = cancelled_runs(registry, 3, promote=(0,))
    registry.archive_push(url, ids[:2])
    registry.archive_push(url, ids[2:])
    assert len(segments(registry, url)) == 2  # one per push
    reads.clear()
    listing = registry.archive_list(url)
    assert manifest_reads(reads) == [] and {r["run_id"] for r in listing["runs"]} == set(ids)
    registry.promote(ids[1], reason="later")
    registry.archive_push(url, [ids[1]])  # a rewritten manifest: a new entry for its new version
    reads.clear()
    assert {r["run_id"]: r["promoted"] for r in registry.archive_list(url)["runs"]}[ids[1]] is True
    assert manifest_reads(reads) == []
    r = registry.archive_gc(url)
    assert r["index"]["entries"] == 3 and r["index"]["segments_deleted"] == 3 and len(segments(registry, url)) == 1
    reads.clear()
    assert registry.archive_list(url) == listing | {"runs": registry.archive_list(url)["runs"]} and manifest_reads(reads) == []
    reads.clear()
    registry.archive_gc(url)  # a gc over a compacted index reads no manifest either
    assert manifest_reads(reads) == []
