"""Shared by the benchmarks: wall time and peak RSS of one fresh process."""

from __future__ import annotations

import os
import selectors
import subprocess
import time


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float, int, str, str]:
    """(wall seconds, peak RSS MiB, exit code, stdout, stderr) of one fresh process."""
    full = dict(os.environ)
    full.update(env or {})
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full)
    out, err = _communicate(proc)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode, out, err


def _communicate(proc: subprocess.Popen) -> tuple[str, str]:
    """Read both pipes to EOF without reaping the child (wait4 reaps it, for its rusage)."""
    bufs = {proc.stdout: [], proc.stderr: []}
    sel = selectors.DefaultSelector()
    for f in bufs:
        sel.register(f, selectors.EVENT_READ)
    while sel.get_map():
        for key, _ in sel.select():
            data = os.read(key.fileobj.fileno(), 1 << 16)
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
            else:
                bufs[key.fileobj].append(data)
    return b"".join(bufs[proc.stdout]).decode(), b"".join(bufs[proc.stderr]).decode()
