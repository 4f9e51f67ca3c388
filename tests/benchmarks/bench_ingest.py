"""Ingest benchmark: casruns' blob store against b3sum + zstd, restic and borg.

Run on demand (it is not a pytest test and asserts nothing about timings)::

    .venv/bin/python tests/benchmarks/bench_ingest.py            # 1024 MiB large files
    .venv/bin/python tests/benchmarks/bench_ingest.py --quick    # 200 MiB large files
    .venv/bin/python tests/benchmarks/bench_ingest.py --size-mb 512 --repeat 1

It needs root for ``apt-get`` (only when a baseline is missing) and about 4x the large
file size free under /work. The default run takes about 5 minutes on 2 cores.

What it does
------------
1. Makes sure the baselines are there: the Debian packages restic, borgbackup, b3sum and
   zstd are installed with ``apt-get install -y`` when their commands are missing
   (``apt-get update`` is run only if that install fails). A baseline that still cannot be
   installed is reported as unavailable and skipped.
2. Generates three data sets in a temp dir under /work (removed at the end):
   * ``text``: one large compressible file of log-like lines (timestamps, levels,
     components, words, hex ids and numbers drawn from a pool of 100,000 distinct lines,
     so zstd -3 reaches roughly 4x and chunking tools find nothing to dedup);
   * ``random``: one large incompressible file (``os.urandom``) of the same size;
   * ``small``: 5,000 files of 1-16 KiB of log-like text in 100 nested directories, each
     with its own timestamps, so they do not dedup against each other.
3. Times, for each data set, each tool as a separate process (wall clock from spawn to
   exit, so every tool pays its own start-up; casruns' in-process time is shown as well):
   * ``casruns``: a fresh ``DiskStore`` each time. A large file is one durable
     ``store.put_file``; the small files are one ``tree.collect`` into one batch plus the
     tree blob, synced when the batch ends (how a run's artifacts are ingested). In a
     format-2 store that batch writes one pack file (spec/format.md, "Packs"); ``--loose``
     measures the format-1 layout instead (one file per blob), for comparison.
   * ``b3sum`` and ``zstd -3 -T2``, run one after the other, and their sum: the cost of
     hashing plus compressing with the reference tools. Large file: ``b3sum FILE`` and
     ``zstd -3 -T2 -c FILE > out``. Small files: one ``b3sum`` with all 5,000 paths as
     arguments, and one ``zstd -3 -T2 -r --output-dir-mirror OUT DIR``, which compresses
     file by file into one output file each, like the blob store does (a tar stream into
     one frame would skip the per-file work casruns has to do).
   * ``restic backup`` (``--no-scan`` when supported) into a fresh local repository;
     ``restic init`` is not timed.
   * ``borg create --compression zstd,3`` into a fresh ``--encryption=none`` repository;
     ``borg init`` is not timed.
   The page cache cannot be dropped here, so before every timed command the pending
   writes of earlier steps are flushed (``sync``, untimed, so no tool pays for another
   one's dirty pages) and the input is read once (warm cache), equally for every tool.
   Durability differs: casruns, restic and borg fsync what they write; ``zstd -c > out``
   does not.
4. Peak RSS: a child process streams the large files through ``DiskStore.put_file`` and
   back through ``iter_chunks`` and reports ``getrusage(RUSAGE_SELF).ru_maxrss``
   (target: under 100 MiB), cross-checked with ``VmHWM``. The table's ``RSS`` column is
   each tool process' peak RSS, taken from ``wait4``. Linux carries a parent's peak RSS
   into its children's ``ru_maxrss``, so the data are generated in a throw-away child and
   the figure below which no RSS can go (this process' own peak) is printed too.
5. Prints one table (MB = 10^6 bytes) and the ratios the project targets:
   casruns vs restic MB/s on ``text`` (>= 2x), casruns vs ``zstd -3 -T2`` time on
   ``text`` (<= 1.3x), casruns vs restic files/s on ``small`` (>= 1.5x), and the start-up
   floor of ``python -c pass``.

Every measurement is repeated (``--repeat``, default 3; the tools take turns, round-robin)
and each tool's fastest run is reported: the machines are noisy (the same command varies
by up to 2x here), and the minimum is the least disturbed run. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
MB = 1_000_000
REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
N_SMALL = 5_000

# Debian package for each baseline command.
BASELINES = {"b3sum": "b3sum", "zstd": "zstd", "restic": "restic", "borg": "borgbackup"}


# --------------------------------------------------------------------------------------
# Baseline installation
# --------------------------------------------------------------------------------------
def _apt_install(packages: list[str]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  apt-get install {' '.join(packages)} failed: {' / '.join(tail)}")
    return proc.returncode == 0


def ensure_baselines() -> dict[str, str | None]:
    """Install missing baseline packages; return each command's path (None: unavailable)."""
    missing = [pkg for cmd, pkg in BASELINES.items() if shutil.which(cmd) is None]
    if missing:
        print(f"installing baselines: {' '.join(missing)}")
        if not _apt_install(missing):
            print("  running apt-get update and retrying")
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            for pkg in missing:  # one by one, so one bad package does not sink the rest
                _apt_install([pkg])
    found = {cmd: shutil.which(cmd) for cmd in BASELINES}
    for cmd, path in found.items():
        if path is None:
            print(f"baseline {cmd} (package {BASELINES[cmd]}) is unavailable: skipped")
    return found


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip("* ") if lines else "?"


def help_mentions(cmd: list[str], flag: str) -> bool:
    out = subprocess.run(cmd, capture_output=True, text=True)
    return flag in out.stdout + out.stderr


# --------------------------------------------------------------------------------------
# Data generation
# --------------------------------------------------------------------------------------
WORDS = (
    "request handler worker cache miss hit flush commit rollback retry timeout connect "
    "accept close open read write checkpoint epoch step loss grad batch shard replica "
    "leader follower vote term snapshot compact merge index query plan scan"
).split()
LEVELS = ["INFO"] * 6 + ["DEBUG"] * 3 + ["WARN", "ERROR"]
COMPONENTS = ["scheduler", "trainer", "loader", "store", "net.http", "net.grpc", "db.pool", "gc", "metrics"]
MILLIS = [f"{m:03d}Z " for m in range(1000)]


def line_pool(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct log-line bodies (everything after the timestamp)."""
    return [
        "%-5s [%s] %s id=%08x n=%d lat=%.3fms %s\n"
        % (
            rng.choice(LEVELS),
            rng.choice(COMPONENTS),
            " ".join(rng.sample(WORDS, rng.randrange(2, 7))),
            rng.getrandbits(32),
            rng.randrange(100_000),
            rng.random() * 250,
            rng.choice(WORDS),
        )
        for _ in range(n)
    ]


def log_second(rng: random.Random, pool: list[str], second: int, lines: int = 1000) -> bytes:
    """``lines`` log lines stamped within one second (one per millisecond)."""
    s = second
    stamp = f"2024-05-{1 + (s // 86400) % 28:02d}T{(s // 3600) % 24:02d}:{(s // 60) % 60:02d}:{s % 60:02d}."
    return "".join([stamp + ms + body for ms, body in zip(MILLIS, rng.choices(pool, k=lines))]).encode()


def write_text_file(path: Path, size: int, rng: random.Random, pool: list[str]) -> None:
    with open(path, "wb") as f:
        written, second = 0, 0
        while written < size:
            block = log_second(rng, pool, second)[: size - written]
            f.write(block)
            written += len(block)
            second += 1


def write_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for offset in range(0, size, 16 * MiB):
            f.write(os.urandom(min(16 * MiB, size - offset)))


def write_small_files(root: Path, rng: random.Random, pool: list[str]) -> None:
    """5,000 files of 1-16 KiB in 10 x 10 nested directories."""
    for i in range(N_SMALL):
        d = root / f"proj{i % 10}" / f"step{(i // 10) % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 16 * 1024)
        # A distinct starting second per file, so no two files share content.
        data = log_second(rng, pool, 1_000_000 + i * 7919, lines=size // 60 + 1)[:size]
        (d / f"part-{i:05d}.log").write_bytes(data)


@dataclass
class Dataset:
    name: str
    path: Path  # a file, or a directory for "small"
    nbytes: int
    nfiles: int

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file())


def _write_all(data: Path, size: int) -> None:
    rng = random.Random(20240501)
    pool = line_pool(rng, 100_000)
    write_text_file(data / "text.log", size, rng, pool)
    write_random_file(data / "random.bin", size)
    write_small_files(data / "small", rng, pool)


def generate(work: Path, size: int) -> list[Dataset]:
    """Write the three data sets, in a child process.

    Why a child: a process' peak RSS (``ru_maxrss``) starts at its parent's peak, because
    the kernel carries the high-water mark across fork and exec. Generating here would
    leave this process with a peak of tens of MiB that every measured child inherits.
    """
    data = work / "data"
    data.mkdir()
    t0 = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(target=_write_all, args=(data, size))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"data generation failed (exit code {child.exitcode})")
    print(f"generated data in {time.perf_counter() - t0:.1f}s")
    small = data / "small"
    return [
        Dataset("text", data / "text.log", size, 1),
        Dataset("random", data / "random.bin", size, 1),
        Dataset("small", small, tree_size(small), N_SMALL),
    ]


# --------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------
@dataclass
class Run:
    seconds: float
    cpu: float  # user + system seconds of the process
    rss: int  # peak RSS of the process, bytes
    stdout: str = ""


def warm(ds: Dataset) -> None:
    """Flush earlier writes (untimed) and read the input once so it sits in the page cache."""
    os.sync()
    buf = bytearray(MiB)
    for p in ds.files():
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def timed(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, stdout_path: Path | None = None) -> Run:
    """Run ``cmd`` and return its wall time, CPU time and peak RSS (from wait4).

    Output goes to files, not pipes, so that nothing but ``wait4`` reaps the child.
    """
    with tempfile.TemporaryFile() as err, (open(stdout_path, "wb") if stdout_path else tempfile.TemporaryFile()) as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        if proc.returncode != 0:
            message = err.read().decode(errors="replace")[-500:]
            raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... exited {proc.returncode}: {message}")
        captured = b""
        if not stdout_path:
            out.seek(0)
            captured = out.read()
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, captured.decode())


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# The casruns side, run in a child process like every other tool. Prints the in-process
# ingest time (after imports) on stdout.
CASRUNS_CHILD = r"""
import sys, time
from casruns.store import DiskStore
from casruns.tree import collect
mode, src, dest = sys.argv[1:4]
t0 = time.perf_counter()
store = DiskStore(dest, packing=mode != "tree-loose")
if mode == "file":
    store.put_file(src)
else:
    with store.batch() as batch:
        tree = collect(src, batch)
        tree.store(batch)
print(time.perf_counter() - t0)
"""

# Peak RSS of a streamed put and a streamed read of the same large file. ru_maxrss is what
# the project targets; VmHWM (this process' own high-water mark since exec) cross-checks it,
# as ru_maxrss cannot go below the parent's peak.
RSS_CHILD = r"""
import resource, sys
from casruns.store import DiskStore
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
src, dest = sys.argv[1:3]
after_import = hwm()
store = DiskStore(dest)
info = store.put_file(src)
after_put = peak()
n = 0
for chunk in store.iter_chunks(info.address):
    n += len(chunk)
assert n == info.size, (n, info.size)
print(after_import, after_put, peak(), hwm())
"""


@dataclass
class Result:
    dataset: Dataset
    tool: str
    seconds: float | None  # None: unavailable or failed
    cpu: float = 0.0
    rss: int = 0
    out_bytes: int = 0
    note: str = ""

    @property
    def mbps(self) -> float:
        return self.dataset.nbytes / self.seconds / MB if self.seconds else 0.0

    @property
    def files_per_s(self) -> float:
        return self.dataset.nfiles / self.seconds if self.seconds else 0.0


@dataclass
class Measure:
    """One tool on one data set: ``once()`` makes one timed run and returns it with the
    size of what the tool wrote."""

    tool: str
    note: str
    once: Callable[[], tuple[Run, int]]


class Bench:
    def __init__(self, work: Path, tools: dict[str, str | None], repeat: int) -> None:
        self.work = work
        self.tools = tools
        self.repeat = repeat
        self.results: list[Result] = []
        self.restic_no_scan = bool(tools["restic"]) and help_mentions(["restic", "backup", "--help"], "--no-scan")
        self.restic_v2 = bool(tools["restic"]) and help_mentions(["restic", "init", "--help"], "--repository-version")

    def run_dataset(self, ds: Dataset) -> None:
        """Time every tool ``repeat`` times, round-robin, and keep each tool's fastest run.

        Round-robin rather than all runs of one tool in a row: a slow spell of the host
        then hits every tool alike instead of all the runs of one.
        """
        measures: list[Measure] = []
        for tool, cmd in (("casruns", None), ("b3sum", "b3sum"), ("zstd -3 -T2", "zstd"), ("restic", "restic"), ("borg", "borg")):
            if cmd and not self.tools[cmd]:
                self.results.append(Result(ds, tool, None, note="unavailable"))
                continue
            measures.append(getattr(self, "_" + tool.split()[0])(ds))
            if tool == "casruns" and ds.path.is_dir():
                measures.append(self._casruns(ds, loose=True))
        runs: dict[str, list[tuple[Run, int]]] = {m.tool: [] for m in measures}
        errors: dict[str, str] = {}
        for _ in range(self.repeat):
            for m in measures:
                if m.tool in errors:
                    continue
                warm(ds)
                try:
                    runs[m.tool].append(m.once())
                except Exception as e:  # a failing baseline must not stop the others
                    errors[m.tool] = f"failed: {e}"[:200]
                finally:
                    shutil.rmtree(self.work / "out", ignore_errors=True)
        for m in measures:
            if not runs[m.tool]:
                self.add(Result(ds, m.tool, None, note=errors.get(m.tool, "no run")))
                continue
            run, out_bytes = min(runs[m.tool], key=lambda r: r[0].seconds)
            self.add(Result(ds, m.tool, run.seconds, run.cpu, run.rss, out_bytes, m.note))
            if m.tool == "casruns":
                inproc = min(float(r.stdout) for r, _ in runs[m.tool])
                self.add(Result(ds, "casruns (in-process)", inproc, note="same runs, after imports"))
        b3, zs = find(self.results, ds.name, "b3sum"), find(self.results, ds.name, "zstd -3 -T2")
        if b3 and zs:
            self.add(Result(ds, "b3sum + zstd", b3.seconds + zs.seconds, b3.cpu + zs.cpu, max(b3.rss, zs.rss), zs.out_bytes, "sum of the two"))

    def add(self, r: Result) -> None:
        self.results.append(r)
        print(f"  {r.dataset.name:<7} {r.tool:<22} {fmt(r.seconds, '.2f'):>8} s  {r.mbps:8.1f} MB/s  {r.note}")

    def out(self, name: str) -> Path:
        return fresh(self.work / "out" / name)

    # -- one Measure per tool ----------------------------------------------------------
    def _casruns(self, ds: Dataset, loose: bool = False) -> Measure:
        """casruns as it stores now; with ``loose``, as format 1 did (a file per blob, no pack)."""
        mode = ("tree-loose" if loose else "tree") if ds.path.is_dir() else "file"

        def once():
            out = self.out("casruns")
            run = timed([PYTHON, "-c", CASRUNS_CHILD, mode, str(ds.path), str(out / "blobs")], cwd=REPO_ROOT)
            return run, tree_size(out)

        if loose:
            return Measure("casruns (loose, fmt 1)", "collect+batch, a file per blob", once)
        return Measure("casruns", "collect+batch into a pack" if mode == "tree" else "put_file", once)

    def _b3sum(self, ds: Dataset) -> Measure:
        if ds.path.is_dir():
            rel = [str(p.relative_to(ds.path)) for p in ds.files()]
            return Measure("b3sum", "one call, 5000 args", lambda: (timed(["b3sum", *rel], cwd=ds.path), 0))
        return Measure("b3sum", "mmaps the file (RSS = file)", lambda: (timed(["b3sum", str(ds.path)]), 0))

    def _zstd(self, ds: Dataset) -> Measure:
        def once():
            out = self.out("zstd")
            if ds.path.is_dir():
                run = timed(["zstd", "-3", "-T2", "-q", "-r", "--output-dir-mirror", str(out), "."], cwd=ds.path)
            else:
                run = timed(["zstd", "-3", "-T2", "-q", "-c", str(ds.path)], stdout_path=out / "out.zst")
            return run, tree_size(out)

        note = "one call, -r, file by file" if ds.path.is_dir() else "-c FILE > out, no fsync"
        return Measure("zstd -3 -T2", note, once)

    def _restic(self, ds: Dataset) -> Measure:
        init = ["restic", "init", "-q", *(["--repository-version", "2"] if self.restic_v2 else [])]  # v2 compresses
        backup = ["restic", "backup", "-q", *(["--no-scan"] if self.restic_no_scan else []), ds.path.name]

        def once():
            out = self.out("restic")
            env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=str(out / "repo"), RESTIC_CACHE_DIR=str(out / "cache"))
            subprocess.run(init, env=env, check=True, capture_output=True)
            return timed(backup, cwd=ds.path.parent, env=env), tree_size(out / "repo")

        return Measure("restic", "backup" + (" --no-scan" if self.restic_no_scan else ""), once)

    def _borg(self, ds: Dataset) -> Measure:
        def once():
            out = self.out("borg")
            env = dict(
                os.environ,
                BORG_BASE_DIR=str(out / "base"),  # a fresh cache too
                BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            )
            repo = str(out / "repo")
            subprocess.run(["borg", "init", "--encryption=none", repo], env=env, check=True, capture_output=True)
            run = timed(["borg", "create", "--compression", "zstd,3", f"{repo}::bench", ds.path.name], cwd=ds.path.parent, env=env)
            return run, tree_size(out / "repo")

        return Measure("borg", "create --compression zstd,3", once)

    def rss(self, ds: Dataset) -> tuple[float, ...] | None:
        out = self.out("rss")
        try:
            proc = subprocess.run(
                [PYTHON, "-c", RSS_CHILD, str(ds.path), str(out / "blobs")], cwd=REPO_ROOT, capture_output=True, text=True, check=True
            )
            return tuple(map(float, proc.stdout.split()))
        except (subprocess.CalledProcessError, ValueError) as e:
            print(f"  rss child failed: {getattr(e, 'stderr', e)}")
            return None
        finally:
            shutil.rmtree(out, ignore_errors=True)


def own_peak_rss() -> float:
    """This process' peak RSS in MiB: the floor of every child's ru_maxrss (see generate)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_load(when: str) -> None:
    """Warn when other work runs on the machine: with 2 cores it skews every figure."""
    load = os.getloadavg()[0]
    if load > 0.7:
        print(f"WARNING ({when}): 1-minute load average is {load:.2f}; other processes compete for the CPUs")


def startup_floor(cmd: list[str], n: int = 7) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO_ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[Result]) -> None:
    head = f"{'dataset':<8}{'tool':<22}{'seconds':>9}{'MB/s':>9}{'files/s':>10}{'cpu s':>8}{'RSS MiB':>9}{'out MB':>9}  note"
    print(head)
    print("-" * len(head))
    last = None
    for r in results:
        if last is not None and r.dataset.name != last:
            print()
        last = r.dataset.name
        ok = r.seconds is not None
        print(
            f"{r.dataset.name:<8}{r.tool:<22}{fmt(r.seconds, '.3f'):>9}"
            f"{fmt(r.mbps if ok else None, '.1f'):>9}{fmt(r.files_per_s if ok else None, '.0f' if r.dataset.nfiles > 1 else '.2f'):>10}"
            f"{fmt(r.cpu if ok and r.cpu else None, '.2f'):>8}{fmt(r.rss / MiB if r.rss else None, '.1f'):>9}"
            f"{fmt(r.out_bytes / MB if r.out_bytes else None, '.1f'):>9}  {r.note}"
        )


def find(results: list[Result], dataset: str, tool: str) -> Result | None:
    for r in results:
        if r.dataset.name == dataset and r.tool == tool and r.seconds:
            return r
    return None


def print_ratios(results: list[Result]) -> None:
    def line(label: str, value: float | None, inproc: float | None, target: str, ok) -> None:
        if value is None:
            print(f"  {label:<48} -       (baseline unavailable)      target {target}")
            return
        verdict = "meets" if ok(value) else "MISSES"
        print(f"  {label:<48} {value:5.2f}x  (in-process {fmt(inproc, '.2f')}x)  target {target}: {verdict}")

    c_text, c_text_in = find(results, "text", "casruns"), find(results, "text", "casruns (in-process)")
    c_small, c_small_in = find(results, "small", "casruns"), find(results, "small", "casruns (in-process)")
    restic_text, restic_small = find(results, "text", "restic"), find(results, "small", "restic")
    zstd_text = find(results, "text", "zstd -3 -T2")

    def ratio(a, b, attr):
        return getattr(a, attr) / getattr(b, attr) if a and b else None

    print("ratios (casruns measured as a whole process; in-process excludes interpreter start and imports):")
    line("casruns MB/s / restic MB/s, text", ratio(c_text, restic_text, "mbps"), ratio(c_text_in, restic_text, "mbps"), ">= 2", lambda v: v >= 2)
    line("casruns time / zstd -3 -T2 time, text", ratio(c_text, zstd_text, "seconds"), ratio(c_text_in, zstd_text, "seconds"), "<= 1.3", lambda v: v <= 1.3)
    line(
        "casruns files/s / restic files/s, small",
        ratio(c_small, restic_small, "files_per_s"),
        ratio(c_small_in, restic_small, "files_per_s"),
        ">= 1.5",
        lambda v: v >= 1.5,
    )


# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 MiB large files instead of 1024 MiB")
    ap.add_argument("--size-mb", type=int, default=None, help="size of each large file in MiB (overrides --quick)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement, the fastest reported (default 3)")
    args = ap.parse_args(argv)
    size = (args.size_mb or (200 if args.quick else 1024)) * MiB

    tools = ensure_baselines()
    check_load("before")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, large files {size // MiB} MiB, {N_SMALL} small files")
    for cmd, vcmd in [("b3sum", ["b3sum", "--version"]), ("zstd", ["zstd", "--version"]), ("restic", ["restic", "version"]), ("borg", ["borg", "--version"])]:
        if tools[cmd]:
            print(f"  {cmd}: {tool_version(vcmd)}")

    work = Path(tempfile.mkdtemp(prefix="casruns-bench-ingest-", dir="/work"))
    try:
        datasets = generate(work, size)
        bench = Bench(work, tools, max(1, args.repeat))
        for ds in datasets:
            print(f"{ds.name}: {ds.nbytes / MB:.1f} MB in {ds.nfiles} file(s)")
            bench.run_dataset(ds)

        print("measuring peak RSS of DiskStore.put_file + iter_chunks in a child process")
        rss = {ds.name: bench.rss(ds) for ds in datasets if ds.name in ("text", "random")}
        floor = startup_floor([PYTHON, "-c", "pass"])
        import_floor = startup_floor([PYTHON, "-c", "import casruns.store, casruns.tree"])

        print()
        print_table(bench.results)
        print()
        for name, figures in rss.items():
            if figures:
                imports, put, peak, hwm = figures
                verdict = "meets" if peak < 100 else "MISSES"
                print(
                    f"peak RSS, {name} {size // MiB} MiB, put_file + iter_chunks: {peak:.1f} MiB ru_maxrss "
                    f"(after put {put:.1f}; VmHWM {hwm:.1f}, after imports {imports:.1f}); target < 100 MiB: {verdict}"
                )
        print(f"RSS column and ru_maxrss cannot go below this bench process' own peak, {own_peak_rss():.1f} MiB (inherited across exec)")
        print(f"start-up floor: python -c pass {floor * 1000:.0f} ms; import casruns.store+tree {import_floor * 1000:.0f} ms (medians of 7)")
        print()
        print_ratios(bench.results)
        check_load("after")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
