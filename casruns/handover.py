"""The hand-over: starting a detached supervisor and giving it its payload.

``submit`` and ``reap`` start ``python -m casruns.supervisor ROOT RUN_ID`` in its own session
with the run's supervisor lock inherited, and write it one framed payload on stdin: the
environment, secret values, umask and (when stored redacted or lossy) the real argv. The frame
has a length, an end marker and a checksum, so a sender that dies mid-way is detected and the
run is failed (``payload_incomplete``), never run with a partial payload (spec/format.md, "The
payload hand-over"). This module is what intake and recovery import; the supervisor's own
module loads only in the supervisor process.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time

from . import faults, fsutil
from .runs import RunDir

LOCK_FD_ENV = "CASRUNS_SUPERVISOR_LOCK_FD"
# Variables a command gets from the submitter's environment unless --env says more.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SHELL")
# Variables the supervisor process itself keeps (how to import casruns, plugins, tests).
SUPERVISOR_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "CASRUNS_PLUGINS", "CASRUNS_TRACE_PLUGINS")


def spawn(root: str, run_id: str, payload: dict, lock_fd: int | None, *, by: str = "submit") -> int:
    """Start a detached supervisor for ``run_id``; returns its pid.

    ``lock_fd`` is the run's supervisor lock, already held: the child inherits it so the
    lock is never free while the run is alive. ``by`` names the caller (``submit`` or
    ``reap``) for the fault points of the hand-over.

    Crash windows of the hand-over (spec/format.md, "The payload hand-over"): if the caller
    dies after starting the supervisor and before the last byte of the framed payload, the
    supervisor reads end-of-file before the end marker and ends the run ``failed`` with
    ``payload_incomplete``, never running the command.
    """
    env = {k: os.environ[k] for k in SUPERVISOR_ENV if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("CASRUNS_TEST_")})
    pass_fds: tuple[int, ...] = ()
    if lock_fd is not None:
        env[LOCK_FD_ENV] = str(lock_fd)
        pass_fds = (lock_fd,)
    run = RunDir(os.path.join(root, "runs"), run_id)
    log_fd = fsutil.open_private(run.file("supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "casruns.supervisor", root, run_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            start_new_session=True,
            close_fds=True,
            pass_fds=pass_fds,
            env=env,
            cwd="/",
        )
    finally:
        os.close(log_fd)
    assert proc.stdin is not None
    frame = encode_payload(payload)
    faults.point(f"{by}_after_spawn")
    try:
        half = len(frame) // 2
        proc.stdin.write(frame[:half])
        proc.stdin.flush()
        faults.point(f"{by}_mid_payload")
        proc.stdin.write(frame[half:])
        proc.stdin.close()
    except BrokenPipeError:
        pass
    # The Popen object is dropped without wait(): a short-lived caller exits and init reaps
    # the supervisor; a long-lived embedder's subprocess module reaps it at a later Popen.
    return proc.pid


PAYLOAD_MAGIC = b"casruns-payload/v1"
PAYLOAD_MAX = 16 << 20  # bytes of JSON: environments are small; a larger frame is not ours
PAYLOAD_WAIT = 60.0  # seconds (monotonic) the supervisor waits for the whole payload


class PayloadIncomplete(Exception):
    """The hand-over on stdin ended or stalled before its end marker, or failed its checksum."""


def encode_payload(payload: dict) -> bytes:
    """Frame the payload: ``casruns-payload/v1 <length>\n`` + JSON + ``\nend <sha256>\n``.

    The length and the end marker make a truncated hand-over detectable: end-of-file before
    the marker means the sender died, never "an empty payload".
    """
    import hashlib

    body = json.dumps(payload, separators=(",", ":")).encode()
    return b"%s %d\n%s\nend %s\n" % (PAYLOAD_MAGIC, len(body), body, hashlib.sha256(body).hexdigest().encode())


def decode_payload(raw: bytes) -> dict:
    """The payload in a complete frame; raises PayloadIncomplete otherwise."""
    import hashlib

    head, sep, rest = raw.partition(b"\n")
    if not sep:
        raise PayloadIncomplete(f"no payload header ({len(raw)} bytes received)")
    magic, _, length = head.partition(b" ")
    if magic != PAYLOAD_MAGIC or not length.isdigit():
        raise PayloadIncomplete("the payload header is not casruns-payload/v1")
    n = int(length)
    body, trailer = rest[:n], rest[n:]
    if len(body) < n or not trailer.startswith(b"\nend ") or not trailer.endswith(b"\n"):
        raise PayloadIncomplete(f"the payload ended after {len(body)} of {n} bytes, before its end marker")
    if trailer[len(b"\nend ") : -1] != hashlib.sha256(body).hexdigest().encode():
        raise PayloadIncomplete("the payload does not match its checksum")
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise PayloadIncomplete(f"the payload is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise PayloadIncomplete("the payload is not a JSON object")
    return payload


def read_payload(fd: int, wait: float = PAYLOAD_WAIT) -> dict:
    """Read a framed payload from ``fd`` until end-of-file, for at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    parts: list[bytes] = []
    got = 0
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PayloadIncomplete(f"the payload did not arrive within {wait:g}s ({got} bytes received)")
            if not sel.select(timeout=left):
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            parts.append(data)
            got += len(data)
            if got > PAYLOAD_MAX + 4096:
                raise PayloadIncomplete(f"the payload exceeds {PAYLOAD_MAX} bytes")
    return decode_payload(b"".join(parts))
