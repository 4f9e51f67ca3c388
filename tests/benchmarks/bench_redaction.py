"""Benchmark of secret redaction on a large log: in-process throughput and real runs.

Run on demand (it is not a pytest test, and it never asserts timings)::

    .venv/bin/python tests/benchmarks/bench_redaction.py            # 500 MB log
    .venv/bin/python tests/benchmarks/bench_redaction.py --quick    # 100 MB log
    .venv/bin/python tests/benchmarks/bench_redaction.py --size-mb 200 --repeat 2 --profile

What it does
------------
1. **Generates BIGFILE** under ``tempfile.mkdtemp(dir="/work")`` (removed at the end):
   realistic log lines (timestamp, level, component, message) drawn from a pool of 50,000
   distinct lines. Like real logs they hold words that are detector *triggers* (URLs with
   ``://``, "cache key", "tokens=", ...), so the detector regexes really run on most
   blocks, and rare real matches (an ``Authorization: Bearer`` header, a URL with a
   password). Ten random secret values are made; three of them are planted 20 times each
   in forms the value stage must catch (raw, base64 inside a longer string, URL-encoded)
   and in contexts no detector matches, so only the declared values mask them.

2. **In-process throughput** of ``casruns.redaction.StreamRedactor`` fed BIGFILE in
   64 KiB chunks (what the supervisor reads from a pipe) and writing to /dev/null, versus
   the same plain read/write copy loop: values only (the 10 secrets), detectors only
   (``DETECTORS``), both; plus the supervisor's ``Transcript`` (one timestamped line per
   output line), which every run pays as well. MB = 10^6 bytes.

3. **End to end**: real runs through the CLI, ``casruns --root R submit --json -- cat
   BIGFILE`` then ``casruns wait``: (a) without secrets (the default detectors still run),
   (b) with 10 ``--secret-env`` variables set to the random values, and (c) a baseline
   registry whose config switches every detector off, without secrets (no redaction at
   all). For each: wall time from submit to wait's return, and ``started_at ->
   finished_at`` from ``casruns status --json``. The ratio (b)/(a) is printed beside its
   target (below 1.5x). Then the stored stdout (and, for (b), the transcript) is read back
   with ``casruns logs`` and searched for every declared secret and each form redaction
   masks: none may appear in (b); in (a) the planted values do appear (the control that
   shows the search works). The floor ``cat BIGFILE > /dev/null`` is printed too.

With ``--repeat N`` each end-to-end run is repeated N times round-robin and the fastest
is reported. When the ratio misses its target (or with ``--profile``) the in-process
redactor with values and detectors is run under cProfile on 50 MB.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import json
import os
import pstats
import random
import secrets as secrets_mod
import shutil
import string
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote

import ahocorasick_rs

from casruns.redaction import DETECTORS, StreamRedactor, variants

PY = sys.executable
CASRUNS = os.path.join(os.path.dirname(PY), "casruns")
MB = 1_000_000
CHUNK = 64 * 1024
N_SECRETS = 10
PLANTED = 3  # secrets that appear in BIGFILE
PLANTS_EACH = 20
RATIO_TARGET = 1.5

LEVELS = ["INFO"] * 6 + ["DEBUG"] * 3 + ["WARN", "ERROR"]
COMPONENTS = ["scheduler", "trainer", "loader", "store", "net.http", "net.grpc", "db.pool", "gc", "metrics", "auth"]
WORDS = (
    "request handler worker cache miss hit flush commit rollback retry timeout connect accept close open read "
    "write checkpoint epoch step loss grad batch shard replica leader follower vote term snapshot compact merge"
).split()


# -- data -----------------------------------------------------------------------------------------


def make_secrets(rng: random.Random) -> dict[str, str]:
    alphabet = string.ascii_letters + string.digits
    out = {}
    for k in range(N_SECRETS):
        body = "".join(rng.choice(alphabet) for _ in range(20))
        # some with punctuation, so their URL-encoded and JSON forms differ from the raw one
        out[f"BENCH_SECRET_{k}"] = body if k % 2 else f"{body[:10]}/{body[10:]}+!"
    return out


def _line(rng: random.Random) -> str:
    comp = rng.choice(COMPONENTS)
    w = rng.choice(WORDS)
    kind = rng.randrange(12)
    if kind == 0:
        msg = f"GET https://api.internal.example/v1/{w}/{rng.randrange(10**6)}?page={rng.randrange(50)} -> 200 in {rng.randrange(900)}ms"
    elif kind == 1:
        msg = f"cache key {w}:{rng.getrandbits(40):010x} {'hit' if rng.random() < 0.7 else 'miss'}"
    elif kind == 2:
        msg = f"llm call done tokens={rng.randrange(10, 4000)} latency={rng.randrange(50, 3000)}ms model=small"
    elif kind == 3:
        msg = f"{w} step={rng.randrange(10**5)} loss={rng.random():.5f} lr={rng.random() / 100:.6f} grad_norm={rng.random() * 3:.3f}"
    elif kind == 4:
        msg = f'{{"event": "{w}", "shard": {rng.randrange(64)}, "ok": true, "elapsed_ms": {rng.randrange(10**4)}}}'
    else:
        msg = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 14))) + f" id={rng.getrandbits(48):012x}"
    return f"{comp} [{rng.choice(LEVELS)}] {msg}"


def make_bigfile(path: str, size: int, values: dict[str, str], rng: random.Random) -> dict:
    """Write ~``size`` bytes of log lines with planted secrets; returns what was planted."""
    pool = [_line(rng) for _ in range(50_000)]
    planted_names = list(values)[:PLANTED]
    plants: list[bytes] = []
    for name in planted_names:
        v = values[name]
        for i in range(PLANTS_EACH):
            form = i % 3
            if form == 0:
                plants.append(f"auth [INFO] session opened sid={v} for worker-{i}".encode())
            elif form == 1:
                blob = base64.b64encode(f'{{"u":"bench","sid":"{v}","n":{i}}}'.encode()).decode()
                plants.append(f"net.http [DEBUG] cookie blob {blob}".encode())
            else:
                plants.append(f"net.http [DEBUG] GET /cb?next=%2Fhome&sid={quote(v, safe='')} -> 302".encode())
    # rare genuine detector matches
    detector_lines = [
        f"net.http [DEBUG] Authorization: Bearer {secrets_mod.token_urlsafe(24)}".encode(),
        f"db.pool [WARN] connecting to postgres://app:{secrets_mod.token_urlsafe(12)}@db.internal:5432/app".encode(),
    ] * 10
    specials = plants + detector_lines
    rng.shuffle(specials)
    every = max(1, size // (len(specials) + 1))
    written = 0
    next_special = every
    t0 = time.time()
    with open(path, "wb") as f:
        while written < size:
            lines = rng.choices(pool, k=4000)
            # each line gets its own timestamp, so blocks do not repeat
            block = "".join(f"2026-01-15T{(written // 7_000_000) % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}.{(written + i) % 10**6:06d}Z {ln}\n" for i, ln in enumerate(lines)).encode()
            if specials and written + len(block) >= next_special:
                block += specials.pop() + b"\n"
                next_special += every
            f.write(block)
            written += len(block)
        for s in specials:  # whatever did not fit
            f.write(s + b"\n")
            written += len(s) + 1
    return {"size": os.path.getsize(path), "planted": {n: PLANTS_EACH for n in planted_names}, "gen_s": time.time() - t0}


# -- in-process -----------------------------------------------------------------------------------


def copy_loop(path: str, transform=None, close=None) -> float:
    """Seconds to read ``path`` in 64 KiB chunks through ``transform`` into /dev/null."""
    out = os.open(os.devnull, os.O_WRONLY)
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            if transform is not None:
                data = transform(data)
            if data:
                os.write(out, data)
        if close is not None:
            tail = close()
            if tail:
                os.write(out, tail)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.close(out)


def in_process(path: str, size: int, values: dict[str, str]) -> dict:
    from casruns.capture import Transcript

    rows = {}
    rows["plain copy loop"] = (copy_loop(path), None)
    for label, vals, pats in (
        ("values only (10 secrets)", values, {}),
        ("detectors only", {}, DETECTORS),
        ("values + detectors", values, DETECTORS),
    ):
        r = StreamRedactor(vals, pats)
        t = copy_loop(path, r.feed, r.close)
        rows[label] = (t, r.hits)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        tr = Transcript(null)
        t = copy_loop(path, lambda d: (tr.feed("stdout", d), d)[1], lambda: (tr.close(), b"")[1])
    finally:
        os.close(null)
    rows["supervisor Transcript.feed (per line)"] = (t, None)
    print(f"\n(a) in-process, {size / MB:,.0f} MB in 64 KiB chunks -> /dev/null")
    base = rows["plain copy loop"][0]
    for label, (t, hits) in rows.items():
        h = "" if hits is None else f"  matches {sum(hits.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(hits.items()))
        print(f"  {label:<38} {t:7.2f} s  {size / MB / t:8.0f} MB/s  {t / base:6.1f}x copy{h}", flush=True)
    trigger_rates(path)
    return {k: v[0] for k, v in rows.items()}


def trigger_rates(path: str, limit: int = 50 * MB) -> None:
    """How often each detector's literal triggers fire per 64 KiB block (the pattern stage
    runs a detector's regex over the whole block of complete lines when any trigger is in it)."""
    from casruns.redaction import TRIGGERS

    fired = {name: 0 for name in TRIGGERS}
    words = sorted({t for trig in TRIGGERS.values() for t in trig})
    blocks = lines = lines_hit = 0
    with open(path, "rb") as f:
        while blocks * CHUNK < limit:
            data = f.read(CHUNK)
            if not data:
                break
            low = data.lower()
            blocks += 1
            for name, trig in TRIGGERS.items():
                fired[name] += any(t in low for t in trig)
            for line in low.split(b"\n"):
                lines += 1
                lines_hit += any(w in line for w in words)
    shown = ", ".join(f"{k} {100 * v / blocks:.0f}%" for k, v in fired.items() if v)
    print(f"  detector triggers present, share of 64 KiB blocks (first {limit / MB:.0f} MB): {shown or 'none'}")
    print(f"  ... while only {100 * lines_hit / max(lines, 1):.1f}% of lines hold any trigger word: the regexes run on whole blocks")


def profile_redactor(path: str, values: dict[str, str], limit: int = 50 * MB) -> None:
    print(f"\ncProfile: StreamRedactor(values + detectors) over the first {limit / MB:.0f} MB")
    r = StreamRedactor(values, DETECTORS)
    prof = cProfile.Profile()
    with open(path, "rb") as f:
        prof.enable()
        done = 0
        while done < limit:
            data = f.read(CHUNK)
            if not data:
                break
            r.feed(data)
            done += len(data)
        r.close()
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next((k for k, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    for ln in lines[start : start + 16]:
        print("   " + ln[:170])


# -- end to end -----------------------------------------------------------------------------------


def cli(root: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CASRUNS, "--root", root, *args], capture_output=True, env=env)


def parse_ts(s: str) -> float:
    from casruns.timefmt import parse_ts as p

    return p(s)


def e2e_run(root: str, bigfile: str, values: dict[str, str] | None) -> dict:
    env = dict(os.environ)
    args = ["submit", "--json"]
    if values:
        env.update(values)
        for name in values:
            args += ["--secret-env", name]
    t0 = time.perf_counter()
    p = cli(root, *args, "--", "cat", bigfile, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"submit failed: {p.stderr.decode()[-800:]}")
    rid = json.loads(p.stdout)["run_id"]
    w = cli(root, "wait", rid, "--json")
    wall = time.perf_counter() - t0
    st = json.loads(cli(root, "status", rid, "--json").stdout.splitlines()[0])
    run_s = parse_ts(st["finished_at"]) - parse_ts(st["started_at"])
    return {"run_id": rid, "wall": wall, "run_s": run_s, "status": st["status"], "wait_code": w.returncode,
            "queued_s": parse_ts(st["started_at"]) - parse_ts(st["created_at"]), "stdout_size": (st["logs"]["stdout"] or {}).get("size")}


def scan_log(root: str, rid: str, stream: str, needles: dict[bytes, str]) -> tuple[int, dict[str, int], dict[str, int]]:
    """Stream ``casruns logs`` and count (bytes, needle hits per name, [REDACTED:x] per x)."""
    forms = list(needles)
    ac = ahocorasick_rs.BytesAhoCorasick(forms)
    marker = ahocorasick_rs.BytesAhoCorasick([b"[REDACTED:"])
    hold = max(len(f) for f in forms) + 64
    proc = subprocess.Popen([CASRUNS, "--root", root, "logs", rid, "--stream", stream], stdout=subprocess.PIPE)
    total = 0
    found: dict[str, int] = {}
    masks: dict[str, int] = {}
    tail = b""
    assert proc.stdout is not None
    while True:
        data = proc.stdout.read(1 << 20)
        if not data:
            break
        total += len(data)
        buf = tail + data
        cut = len(buf) - hold  # count matches that start before the cut; the rest is re-scanned
        for idx, start, _ in ac.find_matches_as_indexes(buf, overlapping=True):
            if start < cut:
                found[needles[forms[idx]]] = found.get(needles[forms[idx]], 0) + 1
        for _, start, end in marker.find_matches_as_indexes(buf):
            if start < cut:
                close = buf.find(b"]", end, end + 64)
                name = buf[end:close].decode(errors="replace") if close > 0 else "?"
                masks[name] = masks.get(name, 0) + 1
        tail = buf[max(cut, 0):]
    for idx, start, _ in ac.find_matches_as_indexes(tail, overlapping=True):
        found[needles[forms[idx]]] = found.get(needles[forms[idx]], 0) + 1
    for _, start, end in marker.find_matches_as_indexes(tail):
        close = tail.find(b"]", end, end + 64)
        name = tail[end:close].decode(errors="replace") if close > 0 else "?"
        masks[name] = masks.get(name, 0) + 1
    proc.wait()
    return total, found, masks


def floor_cat(bigfile: str) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(f"cat {bigfile} > /dev/null", shell=True, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def py_floor() -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


# -- main -----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 MB instead of 500 MB")
    ap.add_argument("--size-mb", type=int, help="log size in MB (overrides --quick)")
    ap.add_argument("--repeat", type=int, default=1, help="end-to-end runs per configuration (fastest reported)")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process redactor even if the target is met")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    size = (args.size_mb or (100 if args.quick else 500)) * MB
    rng = random.Random(args.seed)
    values = make_secrets(rng)

    print(f"casruns redaction benchmark; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    base = tempfile.mkdtemp(prefix="casruns-bench-redaction-", dir="/work")
    try:
        bigfile = os.path.join(base, "big.log")
        info = make_bigfile(bigfile, size, values, rng)
        size = info["size"]
        print(f"BIGFILE: {size / MB:,.1f} MB of log lines, generated in {info['gen_s']:.1f} s; "
              f"{N_SECRETS} secrets declared, {PLANTED} of them planted {PLANTS_EACH} times each (raw, base64, URL-encoded)")
        cat_s = floor_cat(bigfile)
        print(f"floor: cat BIGFILE > /dev/null  {cat_s:.2f} s ({size / MB / cat_s:,.0f} MB/s); python -c pass {py_floor() * 1e3:.0f} ms", flush=True)

        inproc = in_process(bigfile, size, values)

        # end to end
        reg = os.path.join(base, "reg")
        reg_off = os.path.join(base, "reg-nodetectors")
        for r in (reg, reg_off):
            subprocess.run([CASRUNS, "--root", r, "init"], check=True, capture_output=True)
        with open(os.path.join(reg_off, "config.toml"), "w") as f:  # benchmark setup, outside casruns' writers
            f.write("[redaction.detectors]\n" + "".join(f"{k} = false\n" for k in DETECTORS))
        configs = [
            ("no secrets (detectors on)", reg, None),
            ("10 --secret-env (detectors on)", reg, values),
            ("no redaction (detectors off)", reg_off, None),
        ]
        results: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
        print(f"\n(b) end to end: casruns submit -- cat BIGFILE; casruns wait  ({args.repeat} run(s) each, round-robin)", flush=True)
        for _ in range(args.repeat):
            for label, root, vals in configs:
                r = e2e_run(root, bigfile, vals)
                results[label].append(r)
                print(f"  {label:<34} wall {r['wall']:7.2f} s   started->finished {r['run_s']:7.2f} s   "
                      f"queued->started {r['queued_s']:5.2f} s   status {r['status']}   stdout {r['stdout_size']:,} B", flush=True)
        best = {label: min(rs, key=lambda r: r["run_s"]) for label, rs in results.items()}
        a, b, c = (best[label] for label, _, _ in configs)
        ratio_run = b["run_s"] / a["run_s"]
        ratio_wall = b["wall"] / a["wall"]
        verdict = "meets" if ratio_run < RATIO_TARGET and ratio_wall < RATIO_TARGET else "MISSES"
        print(f"\n  with secrets / without: started->finished {ratio_run:.2f}x, wall {ratio_wall:.2f}x   (target < {RATIO_TARGET}x) -> {verdict}")
        print(f"  without secrets / no redaction at all: started->finished {a['run_s'] / c['run_s']:.2f}x, wall {a['wall'] / c['wall']:.2f}x")
        print(f"  run throughput: {size / MB / a['run_s']:.0f} MB/s without secrets, {size / MB / b['run_s']:.0f} MB/s with, "
              f"{size / MB / c['run_s']:.0f} MB/s no redaction; cat floor {size / MB / cat_s:,.0f} MB/s")

        # the stored logs: no secret may appear
        needles: dict[bytes, str] = {}
        for name, v in values.items():
            for form in variants(v):
                needles.setdefault(form, name)
        print("\n(c) stored logs read back with casruns logs")
        leaks = 0
        for label, run, streams in ((configs[1][0], b, ("stdout", "transcript")), (configs[0][0], a, ("stdout",))):
            for stream in streams:
                t0 = time.perf_counter()
                total, found, masks = scan_log(reg, run["run_id"], stream, needles)
                dt = time.perf_counter() - t0
                found_s = ", ".join(f"{k} {v}" for k, v in sorted(found.items())) or "none"
                masks_s = ", ".join(f"{k} {v}" for k, v in sorted(masks.items())) or "none"
                print(f"  {label:<34} {stream:<10} {total / MB:8.1f} MB in {dt:5.1f} s; secret forms found: {found_s}; masks: {masks_s}")
                if run is b:
                    leaks += sum(found.values())
                    missing = {n: k for n, k in info["planted"].items() if masks.get(n, 0) < k}
                    if missing:
                        print(f"    ! fewer [REDACTED:name] masks than planted secrets for {missing}")
        print(f"  secrets in the redacted run's logs: {leaks} ({'OK' if leaks == 0 else 'LEAK'}); the unredacted control must show "
              f"the {PLANTED} planted names (it does if they are listed above)")

        if verdict == "MISSES" or args.profile:
            profile_redactor(bigfile, values)
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (2 CPUs: above ~1.5 the figures are noisy)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
