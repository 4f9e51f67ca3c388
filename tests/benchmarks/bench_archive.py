"""Benchmark of ``casruns archive push`` and ``casruns archive pull``, to a directory and to S3.

Run on demand (it is not a pytest test, and it never asserts timings)::

    .venv/bin/python tests/benchmarks/bench_archive.py            # 1,000 promoted runs
    .venv/bin/python tests/benchmarks/bench_archive.py --quick    # 200 promoted runs
    .venv/bin/python tests/benchmarks/bench_archive.py --profile  # also cProfile each step

What it does
------------
1. **Builds a registry** under ``tempfile.mkdtemp(dir="/work")`` of N promoted, succeeded
   runs, without supervisors and without ``collect.finish``, that share most of their
   blobs, as a fleet of CI jobs testing one WordPress site would. Each run has

   * artifacts ``db/wordpress.sql`` (a 1 MiB WordPress-like SQL dump), ``composer.lock``,
     ``wp-config-sample.php`` and ``plugins.txt`` -- the same four files in every run;
   * ``results/summary.json``: a small artifact of its own;
   * logs: ``stdout`` of its own (a few KiB), ``stderr`` the same in every run (a PHP
     deprecation warning); no transcript;
   * so its artifact tree is its own too.

   A run references 8 blobs; 3 are its own and 5 are shared, so the registry holds
   ``3N + 5`` blobs. The shared blobs are stored once (one batch); the runs' own blobs go
   into store batches of ``BATCH_RUNS`` runs (synced per batch) written by forked worker
   processes, each batch followed by its manifests. A manifest is a copy of a real queued
   one (``Registry.submit(spawn=False)``, that run then removed) walked queued -> booting ->
   running -> collecting -> succeeded with ``manifest.transition``, given the fields
   ``collect.finish`` writes (``logs``, ``artifacts``, ``exit_code``, ...) and a promotion
   (``retention.promoted`` with one history entry, as ``promote`` writes), and is written
   once, already terminal, with ``runs.create``.

2. **Times the real CLI** as fresh subprocesses (wall clock from spawn to exit, peak RSS
   from ``wait4``), for two destinations in turn:

   * (a) a local directory, and
   * (b) ``s3://<bucket>/fleet`` on a moto S3 server this script starts in a thread on
     127.0.0.1 (loopback only; credentials ``testing``), reached through s3fs as a user's
     casruns would (``CASRUNS_S3_ENDPOINT``).

   For each: ``casruns --root R archive push DEST --promoted --json`` (everything new),
   the same push again (everything already there: the cost of a no-op push), ``archive
   pull DEST --json`` of all runs into a fresh registry, and that pull again (every run
   already there). ``python -c pass`` and ``casruns --help`` are the start-up floors. The
   moto server runs inside this process and shares the 2 CPUs with the CLI under test, so
   the S3 figures include the server's own cost (it is in-memory, no network).

3. **Prints** wall time, runs/s, blobs sent vs skipped, bytes sent vs logical bytes (the
   stored, compressed size of every blob each run references, counted once per run; their
   ratio shows the dedup), for S3 the requests the server answered per step (HEAD, GET of an
   object, LIST, PUT: counted from its request log, which is not printed), what the
   destination holds afterwards, and checks each report against what the builder knows
   (blob counts, bytes). ``--profile`` then repeats each
   step (to fresh destinations) under ``python -m cProfile`` and prints the top functions.

Temp dirs are deleted and the server stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import logging
import os
import pstats
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from casruns import Registry, locking, runs, scheduler
from casruns import manifest as mf
from casruns.ids import new_run_id
from casruns.timefmt import format_ts
from casruns.tree import Tree, TreeEntry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timed  # noqa: E402 - shared with the other benchmarks

PY = sys.executable
CASRUNS = os.path.join(os.path.dirname(PY), "casruns")
BATCH_RUNS = 100  # runs whose own blobs go into one store batch
WORKERS = 4  # forked build processes (building is bound by fsync latency)
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
LOOPBACK = "127.0.0.1"

WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
         "magna aliqua wordpress theme plugin widget block editor gutenberg comment post page media gallery shortcode "
         "cache query hook filter action nonce admin dashboard revision draft publish").split()
PLUGINS = ["akismet", "woocommerce", "wordpress-seo", "contact-form-7", "wordfence", "elementor", "jetpack",
           "classic-editor", "wp-mail-smtp", "redirection", "updraftplus", "really-simple-ssl", "litespeed-cache"]


# -- content --------------------------------------------------------------------------------------


def sql_dump(size: int = 1 << 20, seed: int = 7) -> bytes:
    """A WordPress-like mysqldump of exactly ``size`` bytes (compresses as real dumps do)."""
    rng = random.Random(seed)
    out = [
        "-- MySQL dump 10.13  Distrib 8.0.36, for Linux (x86_64)\n--\n-- Host: localhost    Database: wordpress\n"
        "-- ------------------------------------------------------\n-- Server version\t8.0.36\n\n"
        "/*!40101 SET NAMES utf8mb4 */;\n/*!40103 SET TIME_ZONE='+00:00' */;\n\n"
        "DROP TABLE IF EXISTS `wp_posts`;\nCREATE TABLE `wp_posts` (\n  `ID` bigint unsigned NOT NULL AUTO_INCREMENT,\n"
        "  `post_author` bigint unsigned NOT NULL DEFAULT '0',\n  `post_date` datetime NOT NULL DEFAULT '0000-00-00 00:00:00',\n"
        "  `post_content` longtext NOT NULL,\n  `post_title` text NOT NULL,\n  `post_status` varchar(20) NOT NULL DEFAULT 'publish',\n"
        "  `post_name` varchar(200) NOT NULL DEFAULT '',\n  `guid` varchar(255) NOT NULL DEFAULT '',\n"
        "  `post_type` varchar(20) NOT NULL DEFAULT 'post',\n  PRIMARY KEY (`ID`)\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;\n\n"
        "LOCK TABLES `wp_posts` WRITE;\n"
    ]
    n = sum(len(s) for s in out)
    pid = 0
    while n < size - 4096:
        rows = []
        for _ in range(20):
            pid += 1
            title = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 8))).title()
            body = "".join(
                f"<!-- wp:paragraph --><p>{' '.join(rng.choice(WORDS) for _ in range(rng.randrange(12, 40)))}.</p><!-- /wp:paragraph -->\\n"
                for _ in range(rng.randrange(1, 4))
            )
            rows.append(
                f"({pid},{rng.randrange(1, 9)},'2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
                f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}','{body}','{title}',"
                f"'{rng.choice(['publish', 'publish', 'draft', 'inherit'])}','{title.lower().replace(' ', '-')}',"
                f"'https://example.test/?p={pid}','{rng.choice(['post', 'page', 'revision', 'attachment'])}')"
            )
        line = "INSERT INTO `wp_posts` VALUES " + ",".join(rows) + ";\n"
        out.append(line)
        n += len(line)
    tail = "UNLOCK TABLES;\n-- Dump completed on 2024-11-02 03:00:01\n"
    data = "".join(out).encode()
    data = data[: size - len(tail) - 1]
    data = data[: data.rfind(b"\n") + 1]
    pad = size - len(data) - len(tail)
    return data + b"-" * (pad - 1) + b"\n" + tail.encode()


def shared_files() -> dict[str, bytes]:
    rng = random.Random(11)
    lock = {"_readme": ["This file locks the dependencies of your project to a known state"], "content-hash": "%032x" % rng.getrandbits(128),
            "packages": [{"name": f"wpackagist-plugin/{p}", "version": f"{rng.randrange(1, 9)}.{rng.randrange(20)}.{rng.randrange(10)}",
                          "dist": {"type": "zip", "url": f"https://downloads.wordpress.org/plugin/{p}.zip", "shasum": "%040x" % rng.getrandbits(160)}}
                         for p in PLUGINS * 3]}
    config = "<?php\n" + "".join(f"define( '{k}', '{v}' );\n" for k, v in [
        ("DB_NAME", "wordpress"), ("DB_USER", "wp"), ("DB_HOST", "localhost"), ("DB_CHARSET", "utf8mb4"), ("WP_DEBUG", "false")]) + \
        "".join(f"define( '{k}', 'put your unique phrase here' );\n" for k in
                ["AUTH_KEY", "SECURE_AUTH_KEY", "LOGGED_IN_KEY", "NONCE_KEY", "AUTH_SALT", "SECURE_AUTH_SALT", "LOGGED_IN_SALT", "NONCE_SALT"]) + \
        "$table_prefix = 'wp_';\nif ( ! defined( 'ABSPATH' ) ) {\n\tdefine( 'ABSPATH', __DIR__ . '/' );\n}\nrequire_once ABSPATH . 'wp-settings.php';\n"
    plugins = "".join(f"{p}\tactive\t{rng.randrange(1, 9)}.{rng.randrange(20)}.{rng.randrange(10)}\n" for p in PLUGINS)
    return {
        "db/wordpress.sql": sql_dump(),
        "composer.lock": json.dumps(lock, indent=4).encode(),
        "wp-config-sample.php": config.encode(),
        "plugins.txt": plugins.encode(),
    }


STDERR = b"PHP Deprecated:  Creation of dynamic property WP_Block_Type::$uses_context is deprecated in /var/www/html/wp-includes/class-wp-block-type.php on line 604\n"


def own_stdout(rng: random.Random, j: int) -> bytes:
    lines = [f"PHPUnit 9.6.19 by Sebastian Bergmann and contributors. (run {j})\n", "Runtime: PHP 8.2.18\n\n"]
    for k in range(40):
        lines.append(f"{'.' * rng.randrange(40, 63)} {rng.randrange(60 * k + 1, 60 * k + 64):4d} / 2400 ({min(100, 2 * k + 2):3d}%)\n")
    lines.append(f"\nTime: 00:{rng.randrange(10, 59)}.{rng.randrange(1000):03d}, Memory: {rng.randrange(90, 300)}.00 MB\n\nOK (2400 tests, {rng.randrange(5000, 9000)} assertions)\n")
    return "".join(lines).encode()


def own_summary(rng: random.Random, j: int) -> bytes:
    return json.dumps({"run": j, "tests": 2400, "failures": 0, "duration_s": round(rng.uniform(30, 300), 3),
                       "db_queries": rng.randrange(10**5, 10**6), "seed": rng.getrandbits(32), "shard": j % 16}, indent=2).encode()


# -- building -------------------------------------------------------------------------------------


def build_registry(root: str, n_runs: int) -> dict:
    """A registry of ``n_runs`` promoted terminal runs sharing most blobs; returns what it holds."""
    import multiprocessing

    t0 = time.perf_counter()
    reg = Registry(root)
    reg.init()
    rec = reg.submit(["vendor/bin/phpunit", "--testsuite", "integration"], labels={"suite": "wordpress"}, timeout="30m", spawn=False)
    template = copy.deepcopy(reg.run_dir(rec["run_id"]).read_fresh())
    scheduler.dequeue(reg.root, rec["run_id"])
    shutil.rmtree(reg.run_dir(rec["run_id"]).path)

    shared: dict[str, tuple[str, int, int]] = {}  # path -> (address, size, stored size)
    with reg.store.batch() as b:
        for path, data in shared_files().items():
            info = b.put_bytes(data)
            shared[path] = (info.address, len(data), info.stored_size)
        info = b.put_bytes(STDERR)
        stderr_ref = (info.address, len(STDERR), info.stored_size)
    now = time.time()
    tasks = [(root, i, min(i + BATCH_RUNS, n_runs), now, template, shared, stderr_ref) for i in range(0, n_runs, BATCH_RUNS)]
    own: dict[str, int] = {}  # address -> stored size of every run's own blobs
    logical = 0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(WORKERS) as procs:
        for sizes, task_logical in procs.imap_unordered(_task, tasks):
            for a, n in sizes.items():
                if a in own:
                    raise RuntimeError("benchmark blob content collided; every run's own blobs must be distinct")
                own[a] = n
            logical += task_logical
    shared_stored = {a: s for a, _, s in [*shared.values(), stderr_ref]}
    return {
        "runs": n_runs,
        "blobs": len(own) + len(shared_stored),
        "blob_refs": n_runs * (len(shared_stored) + 3),
        "bytes_stored": sum(own.values()) + sum(shared_stored.values()),
        "bytes_logical": logical,
        "content_bytes": n_runs * (sum(s for _, s, _ in shared.values()) + len(STDERR)),  # plus the small own files
        "sql_stored": shared["db/wordpress.sql"][2],
        "build_s": time.perf_counter() - t0,
    }


def _task(task: tuple) -> tuple[dict[str, int], int]:
    root, start, end, now, template, shared, stderr_ref = task
    reg = Registry(root)
    rng = random.Random(1_000_003 * (start + 1))
    sizes: dict[str, int] = {}
    made = []
    shared_stored = sum(s for _, _, s in shared.values()) + stderr_ref[2]
    logical = 0
    with reg.store.batch() as b:
        for j in range(start, end):
            out = own_stdout(rng, j)
            oi = b.put_bytes(out)
            summary = own_summary(rng, j)
            si = b.put_bytes(summary)
            entries = [TreeEntry(p, "file", 0o644, size, a) for p, (a, size, _) in shared.items()]
            entries.append(TreeEntry("results/summary.json", "file", 0o644, len(summary), si.address))
            tree = Tree(sorted(entries, key=lambda e: e.path))
            ti = b.put_bytes(tree.to_bytes())
            for info in (oi, si, ti):
                if info.existed:
                    raise RuntimeError("benchmark blob content collided")
                sizes[info.address] = info.stored_size
            logical += shared_stored + oi.stored_size + si.stored_size + ti.stored_size
            logs = {"stdout": {"blake3": oi.address, "size": len(out)}, "stderr": {"blake3": stderr_ref[0], "size": stderr_ref[1]}}
            made.append((j, logs, ti.address, tree))
    # the batch is synced: now the manifests that reference its blobs may be committed
    for j, logs, tree_addr, tree in made:
        m = _manifest(j, template, rng, now, logs, tree_addr, tree)
        run, lock = runs.create(reg.runs_dir, m)
        lock.release()
        run.remove_workspace()
    return sizes, logical


def _manifest(j: int, template: dict, rng: random.Random, now: float, logs: dict, tree_addr: str, tree: Tree) -> dict:
    finished = now - 3 * 86400 + j * 60.0 + rng.uniform(0, 30)
    started = finished - rng.uniform(30, 300)
    created = started - rng.uniform(0.05, 3.0)
    m = copy.deepcopy(template)
    m["run_id"] = new_run_id(now=created)
    m["created_at"] = m["updated_at"] = format_ts(created)
    m["created_ns"] = int(created * 1e9)
    m["submitted_by"]["pid"] = 10000 + j % 50000
    m["labels"] = {"suite": "wordpress", "branch": rng.choice(["main", "release-6.5", "feature/blocks"]), "shard": str(j % 16)}
    m["request"]["argv"] = ["vendor/bin/phpunit", "--testsuite", "integration", f"--shard={j % 16}/16"]
    m["supervisor"] = {"host": socket.gethostname(), "pid": 20000 + j % 40000, "start_time": 123456, "boot_id": locking.boot_id()}
    mf.transition(m, mf.BOOTING, format_ts(started))
    m["deadline_at"] = format_ts(started + 1800)
    mf.transition(m, mf.RUNNING, format_ts(started + 0.2))
    m["process"] = {"pid": 20000 + j % 40000, "pgid": 20000 + j % 40000, "start_time": 123457, "boot_id": locking.boot_id()}
    mf.transition(m, mf.COLLECTING, format_ts(finished - 0.05))
    m["logs"] = logs
    m["artifacts"] = {"tree": tree_addr, "files": tree.files, "bytes": tree.total_size}
    m["exit_code"] = 0
    m["heartbeat_at"] = format_ts(finished - 0.1)
    m["last_activity_at"] = format_ts(finished - 0.5)
    mf.transition(m, mf.SUCCEEDED, format_ts(finished))
    ret = m.setdefault("retention", {})
    ret["promoted"] = True
    ret["history"] = [{"action": "promote", "at": format_ts(finished + 60), "reason": "release evidence", "by": "bench", "metadata": None}]
    m["updated_at"] = format_ts(finished + 60)
    return m


# -- S3 (moto, loopback only) ---------------------------------------------------------------------


class _Count(logging.Handler):
    """Counts werkzeug's request lines by kind: HEAD, GET (an object), LIST, PUT, ..."""

    REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+)')

    def __init__(self, counter: collections.Counter) -> None:
        super().__init__()
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        m = self.REQUEST.search(record.getMessage())
        if m:
            method, path = m.groups()
            self.counter["LIST" if method == "GET" and "list-type=" in path else method] += 1


class S3:
    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        # Count the server's requests instead of printing a line per request on stderr.
        self.requests: collections.Counter = collections.Counter()
        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)
        log.addHandler(_Count(self.requests))
        log.propagate = False

        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            self.port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.env = {**S3_KEYS, "CASRUNS_S3_ENDPOINT": self.endpoint, "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK}
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        name = f"evidence-{os.urandom(4).hex()}"
        self.client.create_bucket(Bucket=name)
        return name

    def holds(self, bucket: str) -> tuple[int, int]:
        n = size = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                n += 1
                size += o["Size"]
        return n, size

    def stop(self) -> None:
        self.server.stop()


# -- timing ---------------------------------------------------------------------------------------


def cli_step(root: str, args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> dict:
    wall, rss, code, out, err = timed([*(prefix or [CASRUNS]), "--root", root, *args], env)
    try:
        report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    except ValueError:
        report = {"unparsed": out[-500:]}
    if code != 0:
        print(f"    ! casruns {' '.join(args)} exited {code}: {err.strip()[-800:]}", flush=True)
    return {"wall": wall, "rss": rss, "code": code, "report": report}


def floor(argv: list[str]) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return min(times)


def dir_holds(path: str) -> tuple[int, int]:
    n = size = 0
    for d, _, files in os.walk(path):
        for f in files:
            n += 1
            size += os.path.getsize(os.path.join(d, f))
    return n, size


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.2f} MiB"


# -- the measurements ------------------------------------------------------------------------------


def measure(label: str, root: str, url: str, env: dict, holds, base: str, info: dict, requests: collections.Counter | None = None) -> dict:
    n = info["runs"]
    print(f"== ({label}) {url} ==", flush=True)
    res: dict = {}
    for name in ("push", "push2"):
        if requests is not None:
            requests.clear()
        step = res[name] = cli_step(root, ["archive", "push", url, "--promoted", "--json"], env)
        rep = step["report"]
        sent, skipped = rep.get("blobs_sent", 0), rep.get("blobs_skipped", 0)
        bs, bl = rep.get("bytes_sent", 0), rep.get("bytes_logical", 0)
        what = "push (all new)" if name == "push" else "push again (no-op)"
        print(f"  {what:<22} {step['wall']:7.2f} s  {n / step['wall']:7.1f} runs/s  peak RSS {step['rss']:6.1f} MiB  exit {step['code']}", flush=True)
        print(f"      runs {rep.get('runs')}; blobs sent {sent:,} / skipped {skipped:,} ({(sent + skipped) / step['wall']:,.0f} blob refs/s); "
              f"bytes sent {bs:,} ({mib(bs)}) of logical {bl:,} ({mib(bl)}) -> {bl / bs if bs else float('inf'):,.1f}x dedup", flush=True)
        show_requests(requests, n, step["wall"])
    objs, size = holds()
    print(f"      destination holds {objs:,} objects, {size:,} bytes ({mib(size)})", flush=True)
    for name in ("pull", "pull2"):
        dest = os.path.join(base, f"pulled-{label}")
        if requests is not None:
            requests.clear()
        step = res[name] = cli_step(dest, ["archive", "pull", url, "--json"], env)
        rep = step["report"]
        what = "pull into fresh reg." if name == "pull" else "pull again (no-op)"
        print(f"  {what:<22} {step['wall']:7.2f} s  {n / step['wall']:7.1f} runs/s  peak RSS {step['rss']:6.1f} MiB  exit {step['code']}", flush=True)
        print(f"      runs {rep.get('runs')} (present {rep.get('runs_present')}); blobs received {rep.get('blobs_received', 0):,} / "
              f"present {rep.get('blobs_present', 0):,}; bytes received {rep.get('bytes_received', 0):,} ({mib(rep.get('bytes_received', 0))})", flush=True)
        show_requests(requests, n, step["wall"])
    # correctness of the reports against what the builder knows
    p, p2, q, q2 = (res[k]["report"] for k in ("push", "push2", "pull", "pull2"))
    pulled = Registry(os.path.join(base, f"pulled-{label}"))
    checks = [
        ("push runs", p.get("runs"), n),
        ("push blobs_sent", p.get("blobs_sent"), info["blobs"]),
        ("push blobs_skipped", p.get("blobs_skipped"), info["blob_refs"] - info["blobs"]),
        ("push bytes_sent", p.get("bytes_sent"), info["bytes_stored"]),
        ("push bytes_logical", p.get("bytes_logical"), info["bytes_logical"]),
        ("push again blobs_sent", p2.get("blobs_sent"), 0),
        ("push again blobs_skipped", p2.get("blobs_skipped"), info["blob_refs"]),
        ("pull runs", q.get("runs"), n),
        ("pull blobs_received", q.get("blobs_received"), info["blobs"]),
        ("pull blobs_present", q.get("blobs_present"), info["blob_refs"] - info["blobs"]),
        ("pull bytes_received", q.get("bytes_received"), info["bytes_stored"]),
        ("pull again runs_present", q2.get("runs_present"), n),
        ("pulled registry lists promoted runs", len(pulled.list(promoted=True)), n),
        ("pulled registry blobs", sum(1 for _ in pulled.store.iter_addresses()), info["blobs"]),
    ]
    bad = [(k, got, want) for k, got, want in checks if got != want]
    print("  report checks: " + ("all as expected" if not bad else "; ".join(f"{k}: got {got}, expected {want}" for k, got, want in bad)), flush=True)
    shutil.rmtree(os.path.join(base, f"pulled-{label}"), ignore_errors=True)
    print(flush=True)
    return res


def show_requests(requests: collections.Counter | None, n: int, wall: float) -> None:
    if requests is None:
        return
    total = sum(requests.values())
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(requests.items()))
    print(f"      S3 requests {total:,} ({total / n:.1f} per run; {wall / total * 1e3 if total else 0:.1f} ms of wall time each): {kinds}", flush=True)


def profile_steps(label: str, root: str, url_for, env: dict, base: str) -> None:
    """Each step again, to a fresh destination, under ``python -m cProfile`` (a subprocess)."""
    url = url_for()
    pulled = os.path.join(base, f"prof-pulled-{label}")
    steps = [("push (all new)", root, ["archive", "push", url, "--promoted", "--json"]),
             ("push again (no-op)", root, ["archive", "push", url, "--promoted", "--json"]),
             ("pull into fresh reg.", pulled, ["archive", "pull", url, "--json"])]
    for what, r, args in steps:
        out = os.path.join(base, "prof.out")
        step = cli_step(r, args, env, prefix=[PY, "-m", "cProfile", "-o", out, "-m", "casruns"])
        print(f"\n  [{label}] {what} under cProfile: {step['wall']:.2f} s, exit {step['code']}")
        for key, n in (("cumulative", 22), ("tottime", 14)):
            s = io.StringIO()
            pstats.Stats(out, stream=s).sort_stats(key).print_stats(n)
            lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
            start = next((k for k, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
            print(f"  -- top by {key} --")
            for ln in lines[start : start + n + 1]:
                print("   " + ln[:170])
    shutil.rmtree(pulled, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 runs instead of 1,000")
    ap.add_argument("--runs", type=int, help="number of runs (overrides --quick)")
    ap.add_argument("--profile", action="store_true", help="repeat each step under cProfile and print the top functions")
    args = ap.parse_args()
    n = args.runs or (200 if args.quick else 1000)

    la = os.getloadavg()
    print(f"casruns archive benchmark: {n:,} promoted runs; {os.cpu_count()} CPUs; load average {la[0]:.2f} {la[1]:.2f}")
    print(f"python -c pass (start-up floor): {floor([PY, '-c', 'pass']) * 1e3:.1f} ms")
    print(f"casruns --help (CLI start-up floor): {floor([CASRUNS, '--help']) * 1e3:.1f} ms\n", flush=True)
    base = tempfile.mkdtemp(prefix="casruns-bench-archive-", dir="/work")
    s3 = None
    try:
        root = os.path.join(base, "reg")
        info = build_registry(root, n)
        print(f"built in {info['build_s']:.1f} s ({WORKERS} worker processes, batches of {BATCH_RUNS} runs): {info['runs']:,} promoted runs, "
              f"{info['blobs']:,} blobs ({mib(info['bytes_stored'])} stored), {info['blob_refs']:,} blob references "
              f"({mib(info['bytes_logical'])} stored bytes referenced; {mib(info['content_bytes'])}+ of content); "
              f"the shared 1 MiB SQL dump is {info['sql_stored']:,} bytes stored\n", flush=True)

        local = os.path.join(base, "archive")
        results = {"a": measure("a", root, local, {}, lambda: dir_holds(local), base, info)}

        t0 = time.perf_counter()
        s3 = S3()
        bucket = s3.bucket()
        print(f"moto S3 server on {s3.endpoint} (in this process) up in {time.perf_counter() - t0:.2f} s", flush=True)
        results["b"] = measure("b", root, f"s3://{bucket}/fleet", s3.env, lambda: s3.holds(bucket), base, info, s3.requests)

        print("== summary (wall seconds; runs/s) ==")
        print(f"  {'step':<22} {'(a) directory':>22} {'(b) S3 (moto)':>22}")
        for name, what in (("push", "push (all new)"), ("push2", "push again (no-op)"), ("pull", "pull into fresh reg."), ("pull2", "pull again (no-op)")):
            cells = [f"{results[k][name]['wall']:8.2f} s {n / results[k][name]['wall']:8.1f}/s" for k in ("a", "b")]
            print(f"  {what:<22} {cells[0]:>22} {cells[1]:>22}")
        la = os.getloadavg()
        print(f"  load average at the end: {la[0]:.2f} (2 CPUs: above ~1.5 the figures are noisy)", flush=True)

        if args.profile:
            print("\n== profiles (each step repeated to a fresh destination under python -m cProfile) ==", flush=True)
            profile_steps("a", root, lambda: os.path.join(base, "prof-archive"), {}, base)
            profile_steps("b", root, lambda: f"s3://{s3.bucket()}/fleet", s3.env, base)
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
