"""The blob store contract, run against the disk and the memory implementation."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import blake3
import pytest

from casruns.errors import BlobNotFound, IntegrityError, InvalidAddress
from casruns.memstore import MemoryStore
from casruns.store import DiskStore


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path):
    if request.param == "disk":
        return DiskStore(tmp_path / "blobs")
    return MemoryStore()


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


class TestContract:
    @pytest.mark.parametrize("data", [b"", b"x", b"hello world\n" * 1000, os.urandom(300_000)], ids=["empty", "one", "text", "random"])
    def test_round_trip(self, store, data):
        info = store.put_bytes(data)
        assert info.address == b3(data)
        assert info.size == len(data)
        assert not info.existed
        assert store.contains(info.address)
        assert store.read_bytes(info.address) == data
        st = store.stat(info.address)
        assert st.size == len(data) and st.stored_size == info.stored_size

    def test_put_stream_matches_put_bytes(self, store):
        data = os.urandom(50_000) + b"abc" * 400_000
        a = store.put_stream(io.BytesIO(data))
        assert a.address == b3(data) and a.size == len(data)
        assert store.read_bytes(a.address) == data

    def test_identical_content_is_stored_once(self, store):
        a = store.put_bytes(b"same content")
        b = store.put_bytes(b"same content")
        c = store.put_stream(io.BytesIO(b"same content"))
        assert a.address == b.address == c.address
        assert b.existed and c.existed
        assert list(store.iter_addresses()) == [a.address]

    def test_compressible_content_is_stored_smaller(self, store):
        info = store.put_bytes(b"log line number 1234 ok\n" * 10_000)
        assert info.stored_size < info.size / 10

    def test_incompressible_content_pays_little(self, store):
        data = os.urandom(1 << 20)
        info = store.put_bytes(data)
        assert info.stored_size <= len(data) * 1.01 + 64

    def test_missing_blob_is_not_found(self, store):
        with pytest.raises(BlobNotFound):
            store.read_bytes("0" * 64)
        with pytest.raises(BlobNotFound):
            store.stat("0" * 64)

    @pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "0" * 63, "", "0" * 64 + "/x"])
    def test_invalid_addresses_are_refused_before_any_path(self, store, bad):
        with pytest.raises(InvalidAddress):
            store.contains(bad)

    def test_flipped_byte_is_detected_on_read(self, store):
        info = store.put_bytes(b"evidence " * 10_000)
        if isinstance(store, MemoryStore):
            store.corrupt(info.address)
        else:
            path = store.path_for(info.address)
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            path.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError):
            store.read_bytes(info.address)

    def test_delete(self, store):
        info = store.put_bytes(b"to delete")
        assert store.delete(info.address)
        assert not store.contains(info.address)
        assert not store.delete(info.address)

    def test_batch_puts_are_readable_after_sync(self, store):
        with store.batch() as batch:
            infos = [batch.put_bytes(f"file {i}\n".encode() * 10) for i in range(20)]
            again = batch.put_bytes(b"file 3\n" * 10)
            assert again.existed
        for i, info in enumerate(infos):
            assert store.read_bytes(info.address) == f"file {i}\n".encode() * 10

    # -- batches and pins (casruns.batch, casruns.pins): the same contract on both stores --------
    @pytest.mark.parametrize("count", [1, 40], ids=["few", "packed"])
    def test_batch_puts_are_invisible_until_sync(self, store, count):
        datas = [f"pending {i}\n".encode() * 20 for i in range(count)] + [b"streamed " * 300_000]
        with store.batch() as batch:
            infos = [batch.put_bytes(d) for d in datas[:-1]] + [batch.put_stream(io.BytesIO(datas[-1]))]
            assert not any(store.contains(i.address) for i in infos)
            assert all(batch.pending(i.address) == i for i in infos)
        assert all(batch.pending(i.address) is None for i in infos)
        assert [store.read_bytes(i.address) for i in infos] == datas
        assert set(store.iter_addresses()) == {i.address for i in infos}

    def test_a_discarded_batch_stores_nothing(self, store):
        with pytest.raises(RuntimeError):
            with store.batch() as batch:
                infos = [batch.put_bytes(f"abandoned {i}".encode()) for i in range(20)]
                raise RuntimeError("the ingest failed")
        assert not any(store.contains(i.address) for i in infos)
        assert list(store.iter_addresses()) == []

    def test_batch_dedups_against_stored_content(self, store):
        stored = store.put_bytes(b"already here")
        with store.batch() as batch:
            again = batch.put_bytes(b"already here")
            assert again.existed and again.address == stored.address and batch.pending(stored.address) is None
        assert list(store.iter_addresses()) == [stored.address]

    def test_a_pin_holds_every_address_its_batches_use_until_released(self, store):
        old = store.put_bytes(b"deduplicated")
        with store.pin() as pin:
            with store.batch(pin) as batch:
                hit = batch.put_bytes(b"deduplicated")
                new = batch.put_bytes(b"new content")
            assert hit.existed and {old.address, new.address} <= pin.addresses
            assert store.pinned() == {old.address, new.address}  # still held after the sync
            pin.add("c" * 64)
            assert "c" * 64 in store.pinned()
        assert store.pinned() == set()
        assert store.read_bytes(new.address) == b"new content"

    def test_pins_are_released_one_by_one(self, store):
        first, second = store.pin(), store.pin()
        first.add("a" * 64)
        second.add("b" * 64)
        assert store.pinned() == {"a" * 64, "b" * 64}
        first.release()
        assert store.pinned() == {"b" * 64}
        second.release()
        assert store.pinned() == set()


class TestDisk:
    def test_layout_is_sharded_zstd_frame(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        info = store.put_bytes(b"hello")
        path = tmp_path / "blobs" / info.address[:2] / info.address[2:]
        assert path.is_file()
        assert path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd magic
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)

    def test_flipped_byte_is_detected(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        data = b"important evidence\n" * 5000
        info = store.put_bytes(data)
        path = store.path_for(info.address)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        os.chmod(path, 0o600)
        path.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError):
            store.read_bytes(info.address)

    def test_corrupt_stream_never_yields_the_whole_content(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        data = os.urandom(3 << 20)  # several chunks
        info = store.put_bytes(data)
        path = store.path_for(info.address)
        raw = bytearray(path.read_bytes())
        raw[-10] ^= 0xFF
        path.write_bytes(bytes(raw))
        got = b""
        with pytest.raises(IntegrityError):
            for chunk in store.iter_chunks(info.address):
                got += chunk
        assert len(got) < len(data)

    def test_copy_to_leaves_no_file_when_corrupt(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        info = store.put_bytes(b"abc" * 1000)
        path = store.path_for(info.address)
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0xFF
        path.write_bytes(bytes(raw))
        dest = tmp_path / "out.txt"
        with pytest.raises(IntegrityError):
            store.copy_to(info.address, dest)
        assert not dest.exists()
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []

    def test_dedup_hit_refreshes_mtime(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        info = store.put_bytes(b"reused")
        path = store.path_for(info.address)
        os.utime(path, (1_000_000, 1_000_000))
        again = store.put_bytes(b"reused")
        assert again.existed
        assert path.stat().st_mtime > time.time() - 60

    def test_large_streamed_round_trip(self, tmp_path):
        """> 100 MiB through put_file and iter_chunks, never held in memory whole."""
        src = tmp_path / "big.log"
        line = b"2026-11-24T22:00:00Z INFO request served in 12ms path=/wp-admin/%d\n"
        hasher = blake3.blake3()
        with open(src, "wb") as f:
            block = b"".join(line % i for i in range(20_000))
            for i in range(110 * (1 << 20) // len(block) + 1):
                chunk = block + str(i).encode() + b"\n"
                f.write(chunk)
                hasher.update(chunk)
        size = src.stat().st_size
        assert size > 100 * (1 << 20)
        store = DiskStore(tmp_path / "blobs")
        info = store.put_file(src)
        assert info.address == hasher.hexdigest() and info.size == size
        assert store.stat(info.address).size == size
        check = blake3.blake3()
        n = 0
        for chunk in store.iter_chunks(info.address):
            assert len(chunk) <= 1 << 21
            check.update(chunk)
            n += len(chunk)
        assert n == size and check.hexdigest() == info.address

    def test_large_incompressible_streamed_round_trip(self, tmp_path):
        src = tmp_path / "random.bin"
        with open(src, "wb") as f:
            for _ in range(24):
                f.write(os.urandom(1 << 20))
        store = DiskStore(tmp_path / "blobs")
        info = store.put_file(src)
        assert info.stored_size < info.size * 1.01
        assert store.read_bytes(info.address) == src.read_bytes()

    def test_batch_defers_visibility_until_sync(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        batch = store.batch()
        info = batch.put_bytes(b"pending blob")
        assert not store.contains(info.address)
        batch.sync()
        assert store.contains(info.address)
        assert list(store.iter_temp_files()) == []

    def test_batch_with_many_files_uses_one_sync(self, tmp_path, monkeypatch):
        from casruns import fsutil

        calls = []
        real = fsutil.syncfs
        monkeypatch.setattr(fsutil, "syncfs", lambda p: (calls.append(p), real(p)))
        store = DiskStore(tmp_path / "blobs", packing=False)  # registry format 1: loose blobs only
        with store.batch() as batch:
            for i in range(200):
                batch.put_bytes(f"small file {i}".encode())
        assert len(calls) == 2  # data before renames, names after
        assert len(list(store.iter_addresses())) == 200

    def test_failed_batch_discards_its_temp_files(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        with pytest.raises(RuntimeError):
            with store.batch() as batch:
                batch.put_bytes(b"never committed")
                raise RuntimeError("boom")
        assert list(store.iter_addresses()) == []
        assert list(store.iter_temp_files()) == []

    def test_stream_that_changes_size_stores_nothing(self, tmp_path):
        store = DiskStore(tmp_path / "blobs")
        with pytest.raises(Exception):
            store.put_stream(io.BytesIO(b"x" * 100), size=5000)
        assert list(store.iter_addresses()) == []
        assert list(store.iter_temp_files()) == []


def _put_many(path, payloads, q):
    store = DiskStore(path)
    out = []
    for p in payloads:
        out.append(store.put_bytes(p).address)
    q.put(out)


class TestConcurrency:
    def test_concurrent_puts_of_same_and_different_blobs(self, tmp_path):
        path = tmp_path / "blobs"
        same = b"shared payload " * 50_000
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        procs = []
        for i in range(6):
            payloads = [same] + [f"proc {i} item {j} ".encode() * 1000 for j in range(20)] + [same]
            p = ctx.Process(target=_put_many, args=(path, payloads, q))
            p.start()
            procs.append(p)
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        store = DiskStore(path)
        addresses = set(store.iter_addresses())
        assert len(addresses) == 1 + 6 * 20
        for res in results:
            for a in res:
                store.read_bytes(a)  # verifies
        assert b3(same) in addresses
        assert list(store.iter_temp_files()) == []

    def test_writer_killed_mid_write_leaves_no_visible_blob(self, tmp_path):
        """SIGKILL a process while it streams a large blob: only a temp file may remain."""
        path = tmp_path / "blobs"
        script = (
            "import sys, os\n"
            "from casruns.store import DiskStore\n"
            "class Slow:\n"
            "    def __init__(self): self.n = 0\n"
            "    def read(self, k=-1):\n"
            "        self.n += 1\n"
            "        if self.n == 3: print('writing', flush=True)\n"
            "        import time; time.sleep(0.01)\n"
            "        return os.urandom(1 << 20)\n"
            f"DiskStore({str(path)!r}).put_stream(Slow())\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"writing"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = DiskStore(path)
        assert list(store.iter_addresses()) == []
        temps = list(store.iter_temp_files())
        assert len(temps) == 1 and temps[0].stat().st_size > 0


def test_streaming_put_and_read_of_a_large_file_stay_under_100_mib(tmp_path):
    """Memory is bounded whatever the size: 384 MiB of random data (the worst case for zstd's
    buffers) through put_file and iter_chunks in a fresh process, measured by VmHWM."""
    code = (
        "import os, sys\n"
        "from casruns.store import DiskStore\n"
        "p = sys.argv[1]\n"
        "with open(p + '/big.bin', 'wb') as f:\n"
        "    for _ in range(384): f.write(os.urandom(1 << 20))\n"
        "s = DiskStore(p + '/blobs'); info = s.put_file(p + '/big.bin')\n"
        "n = sum(len(c) for c in s.iter_chunks(info.address))\n"
        "assert n == 384 << 20\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(int(hwm) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert int(out.strip()) < 100


def test_the_store_modules_import_nothing_above_them():
    """The layering is one way: packs.py (the format) <- layout, pins, packset, batch, frames <-
    store <- memstore; none of them imports gc, the registry, runs, archive, verify or the CLI
    (at module level or inside a function)."""
    import ast
    from pathlib import Path

    import casruns

    store_modules = ["packs", "layout", "pins", "packset", "batch", "frames", "blobstore", "store", "memstore"]
    allowed = set(store_modules) | {"errors", "ids", "fsutil", "locking"}
    pkg = Path(casruns.__file__).parent
    for name in store_modules:
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                for target in targets:
                    assert target.split(".")[0] in allowed, f"casruns/{name}.py imports casruns.{target}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("casruns") for a in node.names), f"casruns/{name}.py: {ast.dump(node)}"


def test_a_loose_blob_with_bytes_after_its_frame_is_corrupt_for_every_reader(tmp_path):
    """A reader that decoded only the first frame took such a file for a good copy: verify said
    ok and archive push sent it, and only a pull refused it (spec: exactly one frame)."""
    from casruns.errors import IntegrityError

    store = DiskStore(tmp_path / "blobs")
    for data in (b"hello\n" * 1000, os.urandom(300_000), b"\0" * 5_000_000, b""):
        info = store.put_bytes(data)
        assert store.read_bytes(info.address) == data  # a whole frame reads
        path = store.path_for(info.address)
        os.chmod(path, 0o600)
        with open(path, "ab") as f:
            f.write(b"trailing")
        with pytest.raises(IntegrityError, match="after its zstd frame"):
            store.read_bytes(info.address)
        os.unlink(path)
