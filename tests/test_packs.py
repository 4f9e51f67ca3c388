"""Packs: the small blobs of a batch stored in one file (spec/format.md, "Packs").

Covers the format (read back by an independent reader written from the spec), what goes into a
pack and what stays loose, dedup against packed blobs, corruption, crashes, concurrent writers,
readers that outlive a pack gc rewrote, gc, verify, archives and the format-1 rule.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest
import zstandard

from casruns import Registry, batch as batchmod, gc as gcmod, packs, pins
from casruns import store as storemod
from casruns.errors import BlobNotFound, IntegrityError
from casruns.store import DiskStore
from conftest import cli_json
from test_gc import config, evidence, finished_run, make_old

FIXTURE_V1 = Path(__file__).resolve().parent.parent / "fixtures" / "registry-v1"


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def contents(n: int, tag: str = "x") -> list[bytes]:
    return [f"{tag} small blob {i}\n".encode() * (1 + i % 50) for i in range(n)]


def put_batch(store: DiskStore, datas: list[bytes]):
    with store.batch() as batch:
        return [batch.put_bytes(d) for d in datas]


def packs_of(store: DiskStore, n: int, per: int) -> list[bytes]:
    """``n`` packs of ``per`` distinct small blobs each (one batch each); their contents."""
    datas = []
    for k in range(n):
        batch = contents(per, f"pack{k}")
        datas += batch
        put_batch(store, batch)
    return datas


def pack_files(store: DiskStore) -> list[Path]:
    return sorted(store.packs_dir.glob("*.pack")) if store.packs_dir.is_dir() else []


def loose_files(store: DiskStore) -> list[str]:
    return list(store.iter_loose_addresses())


def spec_reader(path: Path) -> dict[str, bytes]:
    """A reader written from spec/format.md alone: trailer, index, frames."""
    raw = path.read_bytes()
    assert raw[-8:] == b"casrpak1"
    index_hash, count = raw[-48:-16], struct.unpack("<Q", raw[-16:-8])[0]
    index = raw[-48 - 56 * count : -48]
    assert blake3.blake3(index).digest() == index_hash
    assert path.name == blake3.blake3(raw).hexdigest() + ".pack"
    out = {}
    for i in range(count):
        addr, offset, length, size = struct.unpack("<32sQQQ", index[56 * i : 56 * (i + 1)])
        content = zstandard.ZstdDecompressor().decompress(raw[offset : offset + length])
        assert len(content) == size
        out[addr.hex()] = content
    assert list(out) == sorted(out)
    return out


# -- format and layout ----------------------------------------------------------------------------


def test_a_batch_of_many_small_blobs_is_one_pack_an_independent_reader_can_read(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    datas = contents(50) + [b""]
    infos = put_batch(store, datas)
    assert loose_files(store) == [] and list((tmp_path / "blobs" / "tmp").iterdir()) == []
    [pack] = pack_files(store)
    assert oct(pack.stat().st_mode & 0o777) == "0o600"
    assert spec_reader(pack) == {b3(d): d for d in datas}
    fresh = DiskStore(tmp_path / "blobs")  # another process' view: loads the index from disk
    for d, info in zip(datas, infos):
        assert info.address == b3(d) and not info.existed
        assert fresh.contains(info.address)
        assert fresh.read_bytes(info.address) == d
        st = fresh.stat(info.address)
        assert st.size == len(d) and st.stored_size == info.stored_size
    assert list(fresh.iter_addresses()) == sorted({b3(d) for d in datas})


def test_a_packed_batch_costs_two_fsyncs_whatever_its_size(tmp_path, monkeypatch):
    """The durability rule with packs: the pack's data, then blobs/packs/ after the rename."""
    store = DiskStore(tmp_path / "blobs")
    put_batch(store, contents(20, "warm-up"))  # creates tmp/ and packs/ (their own syncs)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    put_batch(store, contents(5000))
    assert len(synced) == 2, synced
    assert synced[0].startswith(str(tmp_path / "blobs" / "tmp")) and synced[1] == str(tmp_path / "blobs" / "packs")
    assert len(pack_files(store)) == 2 and loose_files(store) == []


def test_a_batch_with_few_blobs_and_large_blobs_stay_loose(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    few = contents(batchmod.FEW)
    big = os.urandom(packs.MAX_BLOB + 1)
    put_batch(store, few + [big])
    assert pack_files(store) == []
    assert sorted(loose_files(store)) == sorted(b3(d) for d in few + [big])


def test_a_pack_is_closed_at_its_target_size(tmp_path, monkeypatch):
    monkeypatch.setattr(storemod, "PACK_TARGET", 20_000)
    store = DiskStore(tmp_path / "blobs")
    datas = [os.urandom(3000) for _ in range(40)]
    put_batch(store, datas)
    found = pack_files(store)
    assert len(found) >= 5 and loose_files(store) == []
    merged = {}
    for p in found:
        merged.update(spec_reader(p))
    assert merged == {b3(d): d for d in datas}


def test_format_1_store_never_packs(tmp_path):
    store = DiskStore(tmp_path / "blobs", packing=False)
    put_batch(store, contents(30))
    assert pack_files(store) == [] and len(loose_files(store)) == 30


# -- dedup ----------------------------------------------------------------------------------------


def test_a_pinned_writer_dedups_against_a_pack_without_touching_it(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(store, datas)
    [pack] = pack_files(store)
    os.utime(pack, (1000, 1000))
    other = DiskStore(tmp_path / "blobs")
    with other.pin() as pin, other.batch(pin) as batch:
        again = [batch.put_bytes(d) for d in datas[:5] + contents(3, "new")]
    assert [i.existed for i in again] == [True] * 5 + [False] * 3
    assert pin.addresses >= {b3(d) for d in datas[:5]}  # what protects the packed copies from gc
    assert pack.stat().st_mtime == 1000  # a pack's mtime stays its creation time
    assert pack_files(store) == [pack] and len(loose_files(store)) == 3  # the new ones: few, so loose


def test_an_unpinned_writer_stores_its_own_copy_of_packed_content(tmp_path):
    """Nothing would keep gc from deleting the pack under a writer that did not pin."""
    store = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(store, datas)
    info = DiskStore(tmp_path / "blobs").put_bytes(datas[7])
    assert not info.existed
    assert loose_files(store) == [b3(datas[7])]
    assert store.read_bytes(b3(datas[7])) == datas[7]


def test_same_content_twice_in_one_batch_is_stored_once(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    datas = contents(12)
    infos = put_batch(store, datas + datas[:4])
    assert [i.existed for i in infos[12:]] == [True] * 4
    [pack] = pack_files(store)
    assert len(spec_reader(pack)) == 12


# -- corruption -----------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_packed_frame_is_an_integrity_error(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(store, datas)
    [pack] = pack_files(store)
    entry = store.pack_index(pack.name)[b3(datas[3])]
    raw = bytearray(pack.read_bytes())
    raw[entry.offset + entry.length // 2] ^= 0x01
    pack.write_bytes(bytes(raw))
    fresh = DiskStore(tmp_path / "blobs")
    with pytest.raises(IntegrityError):
        fresh.read_bytes(b3(datas[3]))
    assert fresh.read_bytes(b3(datas[4])) == datas[4]


@pytest.mark.parametrize("where", ["index", "trailer", "truncated"])
def test_a_damaged_index_makes_the_pack_unreadable_not_wrong(tmp_path, where):
    store = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(store, datas)
    [pack] = pack_files(store)
    raw = bytearray(pack.read_bytes())
    if where == "index":
        raw[-48 - 56 * 3] ^= 0x01
    elif where == "trailer":
        raw[-1] ^= 0x01
    else:
        raw = raw[: len(raw) // 2]
    pack.write_bytes(bytes(raw))
    fresh = DiskStore(tmp_path / "blobs")
    with pytest.raises(BlobNotFound):
        fresh.read_bytes(b3(datas[0]))
    assert fresh.pack_names() == [] and list(fresh.bad_packs) == [pack.name]


# -- crashes and concurrency ----------------------------------------------------------------------


def test_failed_batch_leaves_no_pack_and_no_temp(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    with pytest.raises(RuntimeError):
        with store.batch() as batch:
            for d in contents(40):
                batch.put_bytes(d)
            raise RuntimeError("collector failed")
    assert pack_files(store) == [] and loose_files(store) == []
    assert list(store.iter_temp_files()) == []


def test_writer_killed_before_its_batch_syncs_leaves_no_visible_pack(tmp_path):
    script = (
        "import sys, os, time\n"
        "from casruns.store import DiskStore\n"
        "s = DiskStore(sys.argv[1])\n"
        "b = s.batch()\n"
        "for i in range(2000):\n"
        "    b.put_bytes(os.urandom(2000))\n"
        "print('written', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "blobs")], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"written\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = DiskStore(tmp_path / "blobs")
    assert pack_files(store) == [] and list(store.iter_addresses()) == []
    assert len(list(store.iter_temp_files())) == 1  # the pack temp, gc's to remove


def _writer(root: str, seed: int, out) -> None:
    store = DiskStore(root)
    shared = [f"shared blob {i}\n".encode() * 20 for i in range(30)]
    mine = [f"writer {seed} blob {i}\n".encode() * 20 for i in range(30)]
    for _ in range(3):
        with store.batch() as batch:
            for d in shared + mine:
                batch.put_bytes(d)
    out.put(seed)


def test_concurrent_batches_of_shared_and_private_blobs(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "blobs"), s, q)) for s in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = DiskStore(tmp_path / "blobs")
    want = [f"shared blob {i}\n".encode() * 20 for i in range(30)]
    want += [f"writer {s} blob {i}\n".encode() * 20 for s in range(5) for i in range(30)]
    for d in want:
        assert store.read_bytes(b3(d)) == d
    assert set(store.iter_addresses()) == {b3(d) for d in want}
    assert list(store.iter_temp_files()) == []


def test_a_reader_finds_a_blob_after_its_pack_was_rewritten(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(store, datas)
    reader = DiskStore(tmp_path / "blobs")
    assert reader.read_bytes(b3(datas[0])) == datas[0]  # the reader has the old index now
    [old] = store.pack_names()
    keep = {b3(d) for d in datas[:10]}
    new = store.rewrite_pack(old, keep)
    store.delete_pack(old)
    assert store.pack_names() == [new]
    assert reader.read_bytes(b3(datas[5])) == datas[5]
    with pytest.raises(BlobNotFound):
        reader.read_bytes(b3(datas[15]))


def test_a_reader_whose_listed_pack_vanishes_before_it_opens_it_looks_again(tmp_path, monkeypatch):
    """gc renames the rewritten pack in, then deletes the old one, after a fresh reader listed
    blobs/packs/ and before it opened the old pack: the reader must list again. (A deletion
    cannot overlap the listing itself: listings hold the sweep lock shared, deletions take it
    exclusively.)"""
    writer = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(writer, datas)
    [old] = writer.pack_names()
    live = {b3(d) for d in datas[:5]}
    reader = DiskStore(tmp_path / "blobs")
    real = os.open
    done = []

    def open_after_gc(path, *args, **kw):
        if str(path).endswith(old) and not done:
            done.append(None)
            done[0] = writer.rewrite_pack(old, live)
            writer.delete_pack(old)
        return real(path, *args, **kw)

    monkeypatch.setattr(storemod.os, "open", open_after_gc)
    assert reader.read_bytes(b3(datas[0])) == datas[0]
    assert done and reader.pack_names() == [done[0]]


def test_a_listing_of_packs_waits_for_a_deletion_in_progress(tmp_path):
    """Deleting a pack takes the sweep lock exclusively; listing packs/ takes it shared. So a
    listing sees the old pack or the new one, never neither (ext4 can return neither name for
    an entry renamed or removed while a listing runs)."""
    import threading

    store = DiskStore(tmp_path / "blobs")
    put_batch(store, contents(20))
    [name] = store.pack_names()
    reader = DiskStore(tmp_path / "blobs")
    listed = []
    with store.exclusive():
        t = threading.Thread(target=lambda: listed.append(reader.pack_names()))
        t.start()
        t.join(0.5)
        assert t.is_alive()  # waiting for the exclusive hold to end
    t.join(10)
    assert listed == [[name]]


def test_a_failed_index_load_leaves_the_reader_consistent(tmp_path, monkeypatch):
    """An I/O error while loading a new index must not leave lookups pointing at nothing."""
    from casruns.errors import RegistryError

    writer = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(writer, datas)
    reader = DiskStore(tmp_path / "blobs")
    assert reader.read_bytes(b3(datas[0])) == datas[0]
    [old] = writer.pack_names()
    writer.rewrite_pack(old, {b3(d) for d in datas[:5]})
    writer.delete_pack(old)
    real = packs.read_index
    monkeypatch.setattr(packs, "read_index", lambda fd, name="pack": (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(RegistryError, match="Input/output error"):
        reader.read_bytes(b3(datas[1]))
    monkeypatch.setattr(packs, "read_index", real)
    assert reader.read_bytes(b3(datas[1])) == datas[1]  # no KeyError from a half-swapped index
    with pytest.raises(BlobNotFound):
        reader.read_bytes(b3(datas[10]))


# -- registry: gc, verify, archive, format --------------------------------------------------------


def many_files(tag: str, n: int = 30) -> dict:
    return {f"out/{tag}-{i}.txt": f"{tag} artifact {i}\n".encode() * 10 for i in range(n)}


def test_runs_with_many_artifacts_store_them_in_a_pack(registry):
    rid = finished_run(registry, files=many_files("a"))
    assert len(pack_files(registry.store)) == 1
    ev = evidence(registry, rid)
    assert ev["out/a-7.txt"] == b"a artifact 7\n" * 10
    proc, out = cli_json("verify", "--read-data")
    assert proc.returncode == 0 and out[0]["ok"], out


def test_gc_deletes_dead_packs_rewrites_mixed_ones_and_keeps_every_live_blob(registry, validate):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\n')
    shared = {f"shared/{i}.txt": f"shared artifact {i}\n".encode() * 10 for i in range(20)}
    gone = finished_run(registry, files={**shared, **many_files("gone")})  # its pack holds the shared blobs
    kept = finished_run(registry, files={**shared, **many_files("kept")}, retain_for=10 * 86400)
    alone = finished_run(registry, files=many_files("alone"))
    registry.promote(kept, reason="evidence")
    before = evidence(registry, kept)
    assert len(pack_files(registry.store)) == 3
    make_old(registry)
    time.sleep(1.1)
    report = registry.gc()
    validate(report, "reports.schema.json#/$defs/gc")
    assert report["runs_removed"] == 2
    assert report["packs_removed"] == 2 and report["packs_rewritten"] == 1
    assert report["blobs_removed"] >= 2 * 30
    assert evidence(registry, kept) == before
    assert {r["run_id"] for r in registry.list()} == {kept}
    addresses = set(registry.store.iter_addresses())
    assert b3(b"gone artifact 1\n" * 10) not in addresses and b3(b"alone artifact 1\n" * 10) not in addresses
    v = registry.verify(read_data=True)
    assert v["ok"] and v["orphans"] == 0, v


def test_gc_keeps_a_pack_whose_garbage_is_pinned(registry):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\n')
    rid = finished_run(registry, files=many_files("p"))
    make_old(registry)
    time.sleep(1.1)
    target = b3(b"p artifact 3\n" * 10)
    store = DiskStore(registry.store.path)
    with store.pin() as pin, store.batch(pin) as batch:
        assert batch.put_bytes(b"p artifact 3\n" * 10).existed  # pinned and found in the pack
        report = registry.gc()
        assert report["runs_removed"] == 1 and report["packs_removed"] == 0
        assert report["blobs_pinned"] >= 1
        assert registry.store.read_bytes(target) == b"p artifact 3\n" * 10
    assert rid not in {r["run_id"] for r in registry.list()}


def test_a_popular_blob_does_not_keep_its_packs_garbage_alive(registry):
    """Dedup hits do not refresh a pack: with a long grace, gc still frees an expired run's
    blobs from the pack a newer run shares one blob of (LICENSE)."""
    config(registry, 'gc_grace = "1h"\n[retention]\nsucceeded = "0s"\n')
    license_text = b"MIT License\n" * 40
    finished_run(registry, files={"LICENSE": license_text, **many_files("old")})
    make_old(registry)
    time.sleep(1.1)
    newer = finished_run(registry, files={"LICENSE": license_text}, retain_for=86400 * 30)
    report = registry.gc()
    assert report["runs_removed"] == 1 and report["packs_removed"] == 1 and report["packs_rewritten"] == 1
    assert report["blobs_removed"] >= 30
    assert evidence(registry, newer)["LICENSE"] == license_text
    assert registry.verify(read_data=True)["ok"]


def test_gc_leaves_a_little_garbage_in_a_big_live_pack(registry):
    config(registry, 'gc_grace = "0s"\n')
    store = registry.store
    live = [os.urandom(4000) for _ in range(40)]
    dead = [os.urandom(1000)]
    with store.batch() as batch:
        for d in live + dead:
            batch.put_bytes(d)
    keep = finished_run(registry, files={f"f{i}": d for i, d in enumerate(live)})
    make_old(registry)
    report = registry.gc()
    assert report["pack_blobs_unused"] == 1 and report["pack_bytes_unused"] > 0 and report["packs_removed"] == 0
    assert store.read_bytes(b3(dead[0])) == dead[0]
    assert registry.verify(read_data=True)["ok"]
    assert evidence(registry, keep)["f3"] == live[3]


def test_gc_merges_many_small_packs_and_readers_follow(registry, validate):
    runs = [finished_run(registry, files=many_files(f"m{k}", 12)) for k in range(gcmod.MERGE_MIN + 2)]
    before = {rid: evidence(registry, rid) for rid in runs}
    reader = Registry(registry.root)
    assert evidence(reader, runs[0]) == before[runs[0]]  # this reader holds the old indexes
    assert len(pack_files(registry.store)) == gcmod.MERGE_MIN + 2
    report = registry.gc()
    validate(report, "reports.schema.json#/$defs/gc")
    assert report["packs_merged"] == gcmod.MERGE_MIN + 2 and report["blobs_removed"] == 0
    assert len(pack_files(registry.store)) == 1
    for rid in runs:
        assert evidence(reader, rid) == before[rid]
    assert registry.verify(read_data=True)["ok"]
    assert registry.gc()["packs_merged"] == 0  # one big pack is left alone


def test_a_merge_that_reproduces_one_of_its_packs_does_not_delete_it(tmp_path, monkeypatch):
    """Found by the packed stress test: packs are named by content, so merging a sorted pack A
    with a pack B holding A's lowest addresses writes A again, byte for byte; deleting the
    group's packs then deleted A, the only copy."""
    store = DiskStore(tmp_path / "blobs")
    datas = contents(20)
    put_batch(store, datas)
    [first] = store.pack_names()
    a = store.rewrite_pack(first, {b3(d) for d in datas})  # sorted by address
    store.delete_pack(first)
    b = store.rewrite_pack(a, set(sorted(b3(d) for d in datas)[:5]))
    assert store.merge_packs([a, b]) == a
    monkeypatch.setattr(gcmod, "MERGE_MIN", 2)
    stats = gcmod.GCStats()
    gcmod._merge_small_packs(store, stats, None)
    assert stats.packs_merged == 1 and DiskStore(tmp_path / "blobs").pack_names() == [a]
    fresh = DiskStore(tmp_path / "blobs")
    for d in datas:
        assert fresh.read_bytes(b3(d)) == d


def test_a_merge_never_makes_a_pack_of_more_entries_than_readers_accept(tmp_path, monkeypatch):
    """Found by review: merge groups were capped by bytes only, so 16 MiB of tiny blobs made a
    pack of more than MAX_ENTRIES entries, which every reader refuses, and its sources were
    deleted. Groups are now capped by entries too."""
    monkeypatch.setattr(packs, "MAX_ENTRIES", 50)
    store = DiskStore(tmp_path / "blobs")
    datas = packs_of(store, 9, 20)
    monkeypatch.setattr(gcmod, "MERGE_MIN", 2)
    stats = gcmod.GCStats()
    gcmod._merge_small_packs(store, stats, None)
    fresh = DiskStore(tmp_path / "blobs")
    assert fresh.bad_packs == {} and len(fresh.pack_names()) < 9
    assert all(len(fresh.pack_index(n)) <= 50 for n in fresh.pack_names())
    for d in datas:
        assert fresh.read_bytes(b3(d)) == d


def test_a_merge_of_many_tiny_packs_opens_one_at_a_time(tmp_path, monkeypatch):
    """Found by review: a merge held every source pack open at once, so thousands of tiny packs
    hit the open-file limit and gc failed on every run, before its cleanup."""
    import resource

    store = DiskStore(tmp_path / "blobs")
    datas = packs_of(store, 120, 9)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # room for what this process has open already (a test session holds sockets and logs), and
    # 40 more: far fewer than the 120 packs a merge holding every source open would need
    in_use = max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))
    try:
        stats = gcmod.GCStats()
        gcmod._merge_small_packs(store, stats, None)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert stats.packs_merged == 120 and len(pack_files(store)) == 1
    fresh = DiskStore(tmp_path / "blobs")
    for d in datas:
        assert fresh.read_bytes(b3(d)) == d


def test_a_settled_pin_keeps_its_name_and_gc_judges_it_by_its_lock(registry):
    """Found by review: settling renamed *.pin to *.done, and a listing running during a rename
    can return neither name, so gc missed the pin. Settling now only frees the flock."""
    from casruns import locking

    store = registry.store
    pin = store.pin()
    pin.add("c" * 64)
    [path] = list(store.pins_dir.glob("*.pin"))
    assert locking.is_held(path)
    pin.release()
    assert path.exists() and not locking.is_held(path) and not list(store.pins_dir.glob("*.done"))
    assert pins.read_pins(store.pins_dir, skip=set()) == {"c" * 64}
    registry.gc()
    assert not path.exists()  # settled before the gc began: its mark covered it


def test_threads_sharing_a_store_keep_the_sweep_lock_until_the_last_leaves(tmp_path):
    """Found by review: one descriptor carried the shared sweep lock for every thread, so one
    thread's unlock ended another's hold mid pin-then-check."""
    from casruns import locking

    store = DiskStore(tmp_path / "blobs")
    with store._sweep_shared():
        with store._sweep_shared():  # a second holder (another thread, or a nested listing)
            pass
        assert not locking.FileLock(str(store.sweep_lock_path())).acquire(blocking=False)  # still held
    probe = locking.FileLock(str(store.sweep_lock_path()))
    assert probe.acquire(blocking=False)  # the last holder left: free
    probe.release()


def test_gc_killed_after_a_pack_merge_loses_nothing_and_the_next_gc_converges(registry):
    runs = [finished_run(registry, files=many_files(f"k{k}", 12)) for k in range(gcmod.MERGE_MIN)]
    before = {rid: evidence(registry, rid) for rid in runs}
    env = {**os.environ, "CASRUNS_TEST_FAULT": "gc_after_pack_merge"}
    proc = subprocess.run([sys.executable, "-m", "casruns", "--root", registry.root, "gc"], env=env, capture_output=True)
    assert proc.returncode == -9
    reg = Registry(registry.root)
    assert len(pack_files(reg.store)) == gcmod.MERGE_MIN + 1  # the merged copy beside the originals
    assert {rid: evidence(reg, rid) for rid in runs} == before
    reg.gc()
    assert len(pack_files(reg.store)) == 1
    assert {rid: evidence(Registry(registry.root), rid) for rid in runs} == before
    assert reg.verify(read_data=True)["ok"]


def test_gc_killed_after_a_pack_rewrite_loses_nothing(registry):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\n')
    shared = {f"s/{i}": f"shared {i}\n".encode() * 30 for i in range(20)}
    finished_run(registry, files={**shared, **many_files("dead")})
    kept = finished_run(registry, files=shared, retain_for=86400 * 30)
    before = evidence(registry, kept)
    make_old(registry)
    time.sleep(1.1)
    env = {**os.environ, "CASRUNS_TEST_FAULT": "gc_after_pack_rewrite"}
    proc = subprocess.run([sys.executable, "-m", "casruns", "--root", registry.root, "gc"], env=env, capture_output=True)
    assert proc.returncode == -9
    reg = Registry(registry.root)
    assert evidence(reg, kept) == before and reg.verify(read_data=True)["ok"]
    report = reg.gc()
    assert report["packs_removed"] >= 1
    assert evidence(Registry(registry.root), kept) == before


def test_verify_finds_and_quarantines_a_corrupt_packed_blob(registry, validate):
    rid = finished_run(registry, files=many_files("q"))
    store = registry.store
    [pack] = pack_files(store)
    bad = b3(b"q artifact 4\n" * 10)
    entry = store.pack_index(pack.name)[bad]
    raw = bytearray(pack.read_bytes())
    raw[entry.offset + entry.length - 5] ^= 0xFF
    pack.write_bytes(bytes(raw))
    proc, out = cli_json("verify", "--read-data", "--quarantine")
    assert proc.returncode != 0
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert [(p["kind"], p.get("address")) for p in out[0]["problems"]] == [("blob_corrupt", bad)]
    assert out[0]["quarantined"] == [bad]
    assert (Path(registry.root) / "quarantine" / bad).is_file()
    reg = Registry(registry.root)
    assert not reg.store.contains(bad)
    assert b"".join(reg.cat(rid, "out/q-5.txt")) == b"q artifact 5\n" * 10
    again = reg.verify(read_data=True)
    assert [p["kind"] for p in again["problems"]] == ["blob_missing"]


def test_verify_reports_and_quarantines_a_pack_with_a_broken_index(registry, validate):
    finished_run(registry, files=many_files("i"))
    [pack] = pack_files(registry.store)
    raw = bytearray(pack.read_bytes())
    raw[-30] ^= 0x01
    pack.write_bytes(bytes(raw))
    proc, out = cli_json("verify", "--quarantine")
    validate(out[0], "reports.schema.json#/$defs/verify")
    kinds = {p["kind"] for p in out[0]["problems"]}
    assert "pack_corrupt" in kinds and "blob_missing" in kinds
    assert out[0]["quarantined_packs"] == [pack.name]
    assert (Path(registry.root) / "quarantine" / pack.name).is_file() and not pack.exists()
    # the run's tree is gone with the pack: gc sweeps nothing and names it (tests/test_faults_gc.py)
    report = Registry(registry.root).gc()
    assert not report["swept"] and [m["where"] for m in report["missing"]] == ["artifacts.tree"]


def test_archive_round_trip_of_packed_blobs_keeps_the_archive_loose(registry, tmp_path):
    rid = finished_run(registry, files=many_files("arc"))
    before = evidence(registry, rid)
    dest = tmp_path / "archive"
    push = registry.archive_push(str(dest), [rid])
    assert push["blobs_sent"] >= 31
    archived = sorted(p for p in (dest / "blobs").rglob("*") if p.is_file())
    assert not list(dest.rglob("*.pack")) and len(archived) == push["blobs_sent"]
    for p in archived:  # byte for byte the frames a loose blob would hold
        assert b3(zstandard.ZstdDecompressor().decompress(p.read_bytes())) == p.parent.name + p.name
    other = Registry(tmp_path / "other")
    other.archive_pull(str(dest), [rid])
    assert evidence(other, rid) == before
    assert len(pack_files(other.store)) == 1  # the pull's batch packed the small frames too
    assert other.verify(read_data=True)["ok"]
    assert registry.verify(against=str(dest))["ok"]


def test_a_format_1_registry_writes_loose_blobs_until_migrated(tmp_path, validate):
    root = tmp_path / "old"
    shutil.copytree(FIXTURE_V1, root)
    reg = Registry(root)
    assert reg.format_version == 1
    a = finished_run(reg, files=many_files("v1"))
    assert pack_files(reg.store) == []
    proc, out = cli_json("migrate", env={"CASRUNS_HOME": str(root)})
    assert proc.returncode == 0 and out[0]["from_version"] == 1 and out[0]["migrated"]
    validate(out[0], "reports.schema.json#/$defs/migrate")
    reg = Registry(root)
    assert reg.format_version == 2
    b = finished_run(reg, files=many_files("v2"))
    assert len(pack_files(reg.store)) == 1
    assert evidence(reg, a)["out/v1-3.txt"] == b"v1 artifact 3\n" * 10
    assert evidence(reg, b)["out/v2-3.txt"] == b"v2 artifact 3\n" * 10
    proc, out = cli_json("migrate", env={"CASRUNS_HOME": str(root)})
    assert proc.returncode == 0 and not out[0]["migrated"]
    proc, out = cli_json("migrate", env={"CASRUNS_HOME": str(tmp_path / "none")})
    assert proc.returncode == 6 and out[0]["error"]["code"] == "registry_error"
    validate(out[0], "error.schema.json")


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_real_run_with_many_artifacts_packs_them_only_in_format_2(tmp_path, fmt):
    """End to end through the CLI and a detached supervisor, which opens its own store."""
    from conftest import cli

    root = tmp_path / "reg"
    if fmt == 1:
        shutil.copytree(FIXTURE_V1, root)
    env = {"CASRUNS_HOME": str(root)}
    script = 'for i in $(seq 1 15); do echo "case $i ok" > "$CASRUNS_ARTIFACTS_DIR/case$i.txt"; done; echo done'
    proc, out = cli_json("submit", "--", "sh", "-c", script, env=env)
    rid = out[0]["run_id"]
    assert cli("wait", rid, "--timeout", "30", env=env).returncode == 0
    reg = Registry(root)
    assert len(pack_files(reg.store)) == (1 if fmt == 2 else 0)
    assert b"".join(reg.cat(rid, "case9.txt")) == b"case 9 ok\n"
    assert reg.verify(read_data=True)["ok"]
