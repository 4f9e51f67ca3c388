"""Capture: the loop that pumps a command's output through the redactor into the spool and the
transcript, and enforces the timeout, cancel and a full disk on the way; writing spooled
output whole; the transcript's line format; the process-group signals.

The loop runs in the supervisor process and is handed the supervisor (its run, redactor,
deadline, config, heartbeat and cancel check): this module imports nothing of it."""

from __future__ import annotations

import os
import selectors
import signal
import time
from typing import TYPE_CHECKING

from . import fsutil, proctree
from . import manifest as mf
from .timefmt import format_ts

if TYPE_CHECKING:
    import subprocess

NO_SPACE = "no_space"  # capture outcome: a spool write found the disk full
POLL = 0.2
READ_SIZE = 65536
TRANSCRIPT_MAX_LINE = 65536


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(pid: int) -> bool:
    """True once ``pid`` exited, without reaping it (so its group id stays reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


class Transcript:
    """The combined transcript: one line per output line, ``<timestamp> <stream> <text>``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.partial: dict[str, tuple[float, bytes]] = {}

    def feed(self, stream: str, data: bytes, arrived: float | None = None) -> None:
        """Add redacted output. ``arrived`` is when the oldest of these bytes was read from
        the pipe (the redactor may have held them back a while); lines that start in this
        data are stamped with it."""
        at = time.time() if arrived is None else arrived
        started, buf = self.partial.get(stream, (at, b""))
        buf += data
        lines = buf.split(b"\n")
        rest = lines.pop()
        # One timestamp string per chunk, not per line: formatting a time per line capped
        # the transcript at 32 MB/s.
        stamps = {started: format_ts(started).encode()}
        stamps.setdefault(at, format_ts(at).encode())
        prefix = b" " + stream.encode() + b" "
        out = []
        for line in lines:
            while len(line) > TRANSCRIPT_MAX_LINE:
                out.append(stamps[started] + prefix + line[:TRANSCRIPT_MAX_LINE] + b"\n")
                line = line[TRANSCRIPT_MAX_LINE:]
            out.append(stamps[started] + prefix + line + b"\n")
            started = at
        while len(rest) > TRANSCRIPT_MAX_LINE:
            out.append(stamps[started] + prefix + rest[:TRANSCRIPT_MAX_LINE] + b"\n")
            rest = rest[TRANSCRIPT_MAX_LINE:]
        if rest:
            self.partial[stream] = (started, rest)
        else:
            self.partial.pop(stream, None)
        if out:
            _write_all(self.fd, b"".join(out))

    def _line(self, ts: float, stream: str, text: bytes) -> bytes:
        return format_ts(ts).encode() + b" " + stream.encode() + b" " + text + b"\n"

    def close(self) -> None:
        for stream, (ts, rest) in sorted(self.partial.items()):
            _write_all(self.fd, self._line(ts, stream, rest))
        self.partial.clear()


def pump(sup, child: "subprocess.Popen") -> tuple[str | None, str | None]:
    """Pump the child's output into the spool until it ends; enforce timeout and cancel."""
    spool = {
        name: fsutil.open_private(sup.run.spool(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        for name in ("stdout", "stderr", "transcript")
    }
    redactors = {"stdout": sup.redactor.stream(), "stderr": sup.redactor.stream()}
    transcript = Transcript(spool["transcript"])
    sel = selectors.DefaultSelector()
    assert child.stdout is not None and child.stderr is not None
    sel.register(child.stdout, selectors.EVENT_READ, "stdout")
    sel.register(child.stderr, selectors.EVENT_READ, "stderr")
    open_streams = 2
    outcome: str | None = None
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM we sent
    exited_at: float | None = None
    deadline = sup.deadline

    pending_since: dict[str, float | None] = {"stdout": None, "stderr": None}

    def emit(name: str, data: bytes) -> None:
        if data and not sup.no_space:
            try:
                _write_all(spool[name], data)
                transcript.feed(name, data, pending_since[name])
            except OSError as e:
                if not fsutil.is_no_space(e):
                    raise
                # Stop spooling (output from here on is dropped) and stop the command.
                sup.no_space = True

    try:
        while True:
            for key, _ in sel.select(timeout=POLL):
                name = key.data
                data = os.read(key.fileobj.fileno(), READ_SIZE)  # type: ignore[union-attr]
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    emit(name, redactors[name].close())
                    continue
                if pending_since[name] is None:
                    pending_since[name] = time.time()  # the oldest byte not yet emitted
                emit(name, redactors[name].feed(data))
                pending_since[name] = None if redactors[name].idle else time.time()
            sup.beat()
            now = time.monotonic()
            if outcome is None:
                if sup.no_space:
                    outcome = NO_SPACE
                elif deadline is not None and now >= deadline:
                    outcome = mf.TIMED_OUT
                elif sup.cancel_requested():
                    outcome = mf.CANCELLED
                if outcome is not None:
                    _killpg(child.pid, signal.SIGTERM)
                    kill_at = time.monotonic() + sup.config.kill_grace
            if kill_at is not None and time.monotonic() >= kill_at:
                _killpg(child.pid, signal.SIGKILL)
                kill_at = None
            if exited_at is None and _exited(child.pid):
                exited_at = time.monotonic()
                # The command is over: whatever it left running in its group goes too,
                # before the child is reaped, so the group id cannot have been reused.
                _killpg(child.pid, signal.SIGTERM)
                _killpg(child.pid, signal.SIGKILL)
                child.wait()
                # Processes that left the group (setsid, double fork) are still our
                # descendants (we are their subreaper): they end with the command too.
                sup.strays_killed = (sup.strays_killed or 0) + proctree.end_descendants(
                    sup.config.kill_grace, spare=sup.spare, group=child.pid
                )
            if exited_at is not None and (open_streams == 0 or time.monotonic() - exited_at > 2.0):
                break  # a process outside the group may hold the pipes; stop after 2 s
    finally:
        for name in ("stdout", "stderr"):
            emit(name, redactors[name].close())
        try:
            if not sup.no_space:
                transcript.close()
        except OSError as e:
            if not fsutil.is_no_space(e):
                raise
            sup.no_space = True
        for fd in spool.values():
            os.close(fd)
        sel.close()
        for stream in (child.stdout, child.stderr):
            try:
                stream.close()
            except Exception:
                pass
    return outcome, None
