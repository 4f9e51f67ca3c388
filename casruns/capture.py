"""Capture helpers: writing spooled output whole, the transcript's line format, and the
process-group signals of the capture loop (which lives in the supervisor)."""

from __future__ import annotations

import os
import time

from .timefmt import format_ts

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
