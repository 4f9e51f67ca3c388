"""The event journal: a registry-wide, append-only, segmented log of committed changes to runs.

Layout under ``<root>/events/`` (spec/events.md)::

    journal.lock                 flock held by whoever appends (one append at a time)
    segments/<start>.seg         a segment; <start> (16 digits) is the journal position of its first byte
    pending/<run>+<seq>+<nonce>  a change being committed: written and flocked by its writer before
                                 the manifest commit, removed after the journal append

A line is ``<crc32 as 8 hex digits> <event JSON>\\n``. The journal position of a byte is its
offset in the concatenation of every segment ever written (segments are named by it, so a
removed segment leaves no hole in the numbering). A **cursor** is the position just after an
event's line, written as 16 decimal digits: cursors compare as strings, and resuming from one
reads from exactly that byte.

The two-step commit (``prepare`` → manifest commit → ``publish``) and the repair of a writer
that died between the steps are in :class:`Pending` and :func:`Journal.resolve`; what counts
as committed is decided by the caller (``runs.committed``), which knows manifests.

Appends hold ``journal.lock`` and end with ``fdatasync``; a torn line left by an appender that
died mid-write is cut off by the next appender before it writes (its event is still pending,
so nothing committed is lost). Readers report complete lines only.
"""

from __future__ import annotations

import binascii
import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator

from . import faults, fsutil
from .errors import CasrunsError, CursorExpired, IntegrityError, InvalidInput

SCHEMA = "casruns/event/v1"
CURSOR_DIGITS = 16
SEGMENT_BYTES = 8 << 20  # rotate the current segment once it is this large
SEGMENT_SUFFIX = ".seg"
MAX_LINE = 1 << 20  # an event line larger than this is not ours
READ_CHUNK = 1 << 20
RESERVE_BYTES = 256 << 10  # freed when the disk is full, so that changes (gc's removals first) can still be journaled


def format_cursor(position: int) -> str:
    return f"{position:0{CURSOR_DIGITS}d}"


def parse_cursor(cursor: str) -> int:
    if not isinstance(cursor, str) or len(cursor) != CURSOR_DIGITS or not cursor.isdigit() or not cursor.isascii():
        raise InvalidInput(f"invalid cursor {cursor!r}: a cursor is the {CURSOR_DIGITS}-digit string an event or a list carried")
    return int(cursor)


def encode_line(event: dict) -> bytes:
    body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
    return b"%08x " % binascii.crc32(body) + body + b"\n"


def decode_line(line: bytes, where: str) -> dict:
    """One complete line (without its newline) → the event; IntegrityError if it was damaged."""
    crc, sep, body = line[:8], line[8:9], line[9:]
    try:
        ok = sep == b" " and int(crc, 16) == binascii.crc32(body)
    except ValueError:
        ok = False
    if not ok:
        raise IntegrityError(f"event journal damaged at {where}: the line's checksum does not match", path=where)
    try:
        event = json.loads(body)
    except ValueError:
        raise IntegrityError(f"event journal damaged at {where}: the line is not JSON", path=where) from None
    if not isinstance(event, dict):
        raise IntegrityError(f"event journal damaged at {where}: the line is not an event", path=where)
    return event


def segment_bytes() -> int:
    """The rotation size: SEGMENT_BYTES, or ``CASRUNS_EVENTS_SEGMENT_BYTES`` (tests, tuning)."""
    raw = os.environ.get("CASRUNS_EVENTS_SEGMENT_BYTES")
    return max(4096, int(raw)) if raw and raw.isdigit() else SEGMENT_BYTES


class Journal:
    """``gc=True``: the journal as gc's removals use it, which may also free ``gc-reserve``, a
    second reserve no other writer touches, so gc can record removals (and so free space) even
    after other writers used up ``reserve`` on a disk that stays full."""

    def __init__(self, events_dir: str | os.PathLike, *, gc: bool = False) -> None:
        self.dir = os.fspath(events_dir)
        self.segments_dir = os.path.join(self.dir, "segments")
        self.pending_dir = os.path.join(self.dir, "pending")
        self.lock_path = os.path.join(self.dir, "journal.lock")
        self.reserve_path = os.path.join(self.dir, "reserve")
        self.gc_reserve_path = os.path.join(self.dir, "gc-reserve")
        self.reserves = (self.reserve_path, self.gc_reserve_path) if gc else (self.reserve_path,)

    # -- segments ---------------------------------------------------------------------------

    def segments(self) -> list[int]:
        """Start positions of the segments present, oldest first (strays are ignored)."""
        try:
            names = os.listdir(self.segments_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        starts = []
        for name in names:
            stem = name[: -len(SEGMENT_SUFFIX)] if name.endswith(SEGMENT_SUFFIX) else ""
            if len(stem) == CURSOR_DIGITS and stem.isdigit():
                starts.append(int(stem))
        starts.sort()
        return starts

    def segment_path(self, start: int) -> str:
        return os.path.join(self.segments_dir, format_cursor(start) + SEGMENT_SUFFIX)

    def end(self) -> int:
        """The journal position after the last complete line (where the next event will start)."""
        starts = self.segments()
        if not starts:
            return 0
        path = self.segment_path(starts[-1])
        try:
            fd = fsutil.open_regular(path)
        except FileNotFoundError:
            return starts[-1]
        try:
            return starts[-1] + _complete_length(fd)
        finally:
            os.close(fd)

    def ensure(self) -> None:
        if os.path.isdir(self.pending_dir) and os.path.isdir(self.segments_dir):
            return
        for d in (self.dir, self.segments_dir, self.pending_dir):
            fsutil.ensure_dir(d)
        self.refill_reserve()

    def refill_reserve(self) -> bool:
        """Allocate the reserves (best-effort: not on a full disk or a filesystem that cannot)."""
        return all([self._refill(p) for p in (self.reserve_path, self.gc_reserve_path)])

    def _refill(self, path: str) -> bool:
        if os.path.exists(path):
            return True
        tmp = os.path.join(self.dir, fsutil.temp_name(os.path.basename(path)))
        try:
            fd = fsutil.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            return True
        except (OSError, CasrunsError):
            fsutil.unlink_quiet(tmp)
            return False

    def _with_space(self, fn):
        """Call ``fn``; on a full disk free a reserve (``reserves``, in order) and try again."""
        spare = list(self.reserves)
        while True:
            try:
                return fn()
            except (OSError, CasrunsError) as e:  # (open_private gives NoSpace for a full disk)
                if not fsutil.is_no_space(e):
                    raise
                while spare and not _unlink(spare[0]):
                    spare.pop(0)
                if not spare:
                    raise
                spare.pop(0)

    # -- appending --------------------------------------------------------------------------

    def append(self, lines: list[bytes]) -> None:
        """Append whole lines under the journal lock and make them durable (fdatasync)."""
        self.ensure()
        data = b"".join(lines)
        done = [0]  # bytes of whole lines a failed attempt left in the journal: not written again
        self._with_space(lambda: self._append(data, done))

    def _append(self, data: bytes, done: list[int] | None = None) -> None:
        done = done if done is not None else [0]
        data = data[done[0]:]
        if not data:
            return
        lock = fsutil.open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            start, fd = self._open_tail()
            size = 0
            try:
                size = _complete_length(fd, repair=True)
                if size >= segment_bytes():
                    os.close(fd)
                    fd = -1
                    start, size = start + size, 0
                    fd = fsutil.open_private(self.segment_path(start), os.O_RDWR | os.O_CREAT | os.O_APPEND)
                    fsutil.fsync_dir(self.segments_dir)
                if faults.armed("event_mid_append"):
                    half = max(1, len(data) // 2)
                    _write_all(fd, data[:half])
                    faults.point("event_mid_append")
                    _write_all(fd, data[half:])
                else:
                    _write_all(fd, data)
                os.fdatasync(fd)
            except BaseException:
                if fd >= 0:
                    # a short write (a full disk) must not leave a partial line for readers to wait on
                    # (cut back to the last newline only: whole lines of ours may have been read
                    # already, so they stay, and a retry writes only the rest)
                    try:
                        done[0] += max(0, _complete_length(fd, repair=True) - size)
                    except OSError:
                        pass
                raise
            finally:
                if fd >= 0:
                    os.close(fd)
        finally:
            os.close(lock)

    def _open_tail(self) -> tuple[int, int]:
        starts = self.segments()
        start = starts[-1] if starts else 0
        path = self.segment_path(start)
        existed = bool(starts)
        fd = fsutil.open_private(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        if not existed:
            fsutil.fsync_dir(self.segments_dir)
        return start, fd

    def expire(self, older_than: float, *, dry_run: bool = False) -> int:
        """Remove the oldest segments whose last append (mtime) is before ``older_than``
        (a wall-clock time), never the newest: the journal stays one contiguous range, and a
        cursor before its new start is ``cursor_expired``. Returns how many went."""
        if not os.path.isdir(self.segments_dir):
            return 0
        removed = 0
        lock = fsutil.open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            starts = self.segments()
            for start in starts[:-1]:
                try:
                    st = os.lstat(self.segment_path(start))
                except FileNotFoundError:
                    continue
                if st.st_mtime >= older_than:
                    break  # a prefix only: the journal has no holes
                if not dry_run:
                    os.unlink(self.segment_path(start))
                removed += 1
            if removed and not dry_run:
                fsutil.fsync_dir(self.segments_dir)
        finally:
            os.close(lock)
        return removed

    # -- reading ----------------------------------------------------------------------------

    def position_of(self, cursor: str) -> int:
        """Check a cursor against the journal: expired, ahead of it, or not at a line boundary."""
        pos = parse_cursor(cursor)
        starts = self.segments()
        if not starts:
            if pos == 0:
                return 0
            raise InvalidInput(f"cursor {cursor} is ahead of this registry's event journal (it is empty): a cursor from another registry?")
        if pos < starts[0]:
            raise CursorExpired(
                f"cursor {cursor} has expired: the journal now starts at {format_cursor(starts[0])}; "
                "resynchronize with `casruns list --json` and follow from the cursor it carries",
                cursor=cursor, oldest=format_cursor(starts[0]),
            )
        seg = max(s for s in starts if s <= pos)
        try:
            fd = fsutil.open_regular(self.segment_path(seg))
        except FileNotFoundError:
            raise CursorExpired(f"cursor {cursor} has expired (its segment was just removed)", cursor=cursor) from None
        try:
            length = _complete_length(fd)
            off = pos - seg
            if off > length:
                raise InvalidInput(f"cursor {cursor} is ahead of this registry's event journal (it ends at {format_cursor(seg + length)})")
            if off > 0 and os.pread(fd, 1, off - 1) != b"\n":
                raise InvalidInput(f"cursor {cursor} does not point at an event boundary")
        finally:
            os.close(fd)
        return pos

    def read(self, position: int) -> Iterator[tuple[int, dict]]:
        """``(cursor position after it, event)`` for every complete line from ``position`` on,
        up to the end as it is now. A segment removed under the reader raises CursorExpired."""
        while True:
            starts = self.segments()
            later = [s for s in starts if s <= position]
            if not later:
                if starts and position < starts[0]:
                    raise CursorExpired(f"events before {format_cursor(starts[0])} were removed while reading", cursor=format_cursor(position))
                return
            seg = later[-1]
            try:
                fd = fsutil.open_regular(self.segment_path(seg))
            except FileNotFoundError:
                continue  # removed under us: look again (expired unless a newer one holds it)
            try:
                position = yield from _read_segment(fd, seg, position, self.segment_path(seg))
            finally:
                os.close(fd)
            if not any(s == position for s in self.segments()):
                return  # nothing after this segment (yet)

    # -- pending changes --------------------------------------------------------------------

    def prepare(self, run_id: str, incarnation: str, events: list[dict], *, kind: str = "update") -> "Pending":
        """Write and flock the record of a change about to be committed (before its commit)."""
        self.ensure()
        return self._with_space(lambda: self._prepare(run_id, incarnation, events, kind))

    def _prepare(self, run_id: str, incarnation: str, events: list[dict], kind: str) -> "Pending":
        last = events[-1]["seq"]
        nonce = os.urandom(6).hex()
        path = os.path.join(self.pending_dir, f"{run_id}+{last}+{nonce}")  # "+" is in no run id
        try:
            end = self.end()
        except (OSError, CasrunsError):
            end = 0  # a damaged journal must not stop the change: its append waits, pending
        doc = {"run_id": run_id, "incarnation": incarnation, "seq": last, "kind": kind,
               "journal_end": end, "lines": [encode_line(e).decode("utf-8", "surrogateescape") for e in events]}
        # built under a temp name and renamed with its flock held: a repairer never sees it
        # unlocked and empty, which it would take for a writer that died before writing it
        tmp = os.path.join(self.pending_dir, fsutil.temp_name(run_id))
        fd = fsutil.open_private(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogateescape"))
            os.fsync(fd)
            os.rename(tmp, path)
            fsutil.fsync_dir(self.pending_dir)
        except BaseException:
            fsutil.unlink_quiet(tmp)
            fsutil.unlink_quiet(path)
            os.close(fd)
            raise
        faults.point("event_after_pending")
        return Pending(self, path, fd, doc)

    def pending_for(self, run_id: str | None = None) -> list[str]:
        try:
            names = os.listdir(self.pending_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        prefix = "" if run_id is None else run_id + "+"
        return sorted((n for n in names if n.count("+") == 2 and n.startswith(prefix)), key=_pending_order)

    def pending_incarnations(self, run_id: str) -> set:
        """The incarnations of ``run_id`` with a pending record (None: unreadable)."""
        out = set()
        for name in self.pending_for(run_id):
            try:
                fd = fsutil.open_regular(os.path.join(self.pending_dir, name))
            except (OSError, CasrunsError):
                continue
            try:
                doc = _read_record(fd)
            finally:
                os.close(fd)
            out.add(doc.get("incarnation", "") if doc else None)
        return out

    def clean_temps(self) -> int:
        """Remove pending records a writer died while building (``.tmp-*``, its pid dead)."""
        try:
            names = os.listdir(self.pending_dir)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        gone = 0
        for name in names:
            if name.startswith(".tmp-") and not fsutil.writer_alive(name):
                fsutil.unlink_quiet(os.path.join(self.pending_dir, name))
                gone += 1
        return gone

    def resolve(self, committed: Callable[[dict], bool | None], run_id: str | None = None, *, wait: bool = False,
                incarnation: str | None = None) -> int:
        """Settle pending changes whose writer is gone: publish (marked ``recovered``) those
        whose change committed and is not in the journal yet, drop the others. A pending change
        whose writer still holds it is skipped (``wait``: waited for). ``committed`` answers
        True, False, or None (cannot tell now: left for later). With ``incarnation``, ``wait`` waits
        only for records of that incarnation: another's (a creator that is losing the race for the
        run id, gc removing an earlier run of it) has no order to keep with this one's changes, and
        its writer, holding no lock of this run, may take its time (or be stopped). Returns how
        many it settled."""
        settled = 0
        # (run, incarnation) with a record left or being settled by someone else: its later
        # records wait (per-run order), another incarnation's do not
        blocked: set[tuple] = set()
        for name in self.pending_for(run_id):
            path = os.path.join(self.pending_dir, name)
            try:
                fd = fsutil.open_regular(path, os.O_RDWR)
            except (FileNotFoundError, CasrunsError):
                continue
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    continue  # a read-only reader cannot repair; a writer will
                raise
            try:
                doc = _read_record(fd)  # complete once named (built under a temp name): no lock needed
                key = (name.split("+", 1)[0], doc.get("incarnation", "") if doc else None)
                if key in blocked:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait or (incarnation is not None and key[1] != incarnation):
                        blocked.add(key)
                        continue  # its writer (or another repairer) is alive and will finish it
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (os.stat(path).st_ino, os.stat(path).st_dev):
                        continue
                except FileNotFoundError:
                    continue  # settled by its writer or another repairer while we waited
                if doc is None:
                    # torn before its fsync: its writer died before committing anything
                    fsutil.unlink_quiet(path)
                    settled += 1
                    continue
                verdict = committed(doc)
                if verdict is None:
                    blocked.add(key)
                    continue
                if verdict:
                    # a torn append of several lines may have left the first ones whole: only
                    # the events the journal does not hold yet are appended
                    try:
                        have = self._present(doc)
                        missing = [e for e in (_decoded(line) for line in doc["lines"]) if e.get("seq") not in have]
                        if missing:
                            self.append([_recovered(e) for e in missing])
                    except (OSError, CasrunsError):
                        # a stray segment, a full disk: left for a later repair (a writer of
                        # the run still commits; the journal catches up once it can)
                        blocked.add(key)
                        continue
                fsutil.unlink_quiet(path)
                settled += 1
            finally:
                os.close(fd)
        return settled

    def _present(self, doc: dict) -> set:
        """The seqs of the pending change's run and incarnation that the journal holds (scanned
        from where the journal ended when the change was prepared)."""
        want = (doc["run_id"], doc.get("incarnation", ""))
        start = max(int(doc.get("journal_end") or 0), (self.segments() or [0])[0])
        have = set()
        try:
            for _, event in self.read(start):
                if (event.get("run_id"), event.get("incarnation", "")) == want:
                    have.add(event.get("seq"))
        except (CursorExpired, IntegrityError):
            pass
        return have

    def _contains(self, doc: dict) -> bool:
        """True if the journal holds the pending change's last event."""
        return doc["seq"] in self._present(doc)


class Pending:
    """A prepared change: published after its commit, abandoned if the commit failed."""

    def __init__(self, journal: Journal, path: str, fd: int, doc: dict) -> None:
        self.journal, self.path, self.fd, self.doc = journal, path, fd, doc
        self.behind = False  # an earlier record of the run is left: this one waits behind it

    def publish(self) -> bool:
        """Append the events and drop the record. A failure to append (a full disk) leaves the
        record for the next writer, reader or reap to publish; returns False then."""
        if self.behind:
            self.close()  # a repairer appends both, in order
            return False
        try:
            faults.point("event_after_commit")
            self.journal.append([line.encode("utf-8", "surrogateescape") for line in self.doc["lines"]])
            faults.point("event_after_append")
        except (OSError, CasrunsError):
            self.close()
            return False
        fsutil.unlink_quiet(self.path)
        self.close()
        return True

    def abandon(self) -> None:
        fsutil.unlink_quiet(self.path)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_record(fd: int) -> dict | None:
    try:
        doc = json.loads(os.pread(fd, MAX_LINE * 4, 0) or b"null")
    except ValueError:
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("lines"), list) and isinstance(doc.get("seq"), int)
    return doc if ok else None


def _pending_order(name: str):
    """``<run_id>+<seq>+<nonce>`` in run and numeric seq order (seq 9 before seq 10)."""
    rid, seq, nonce = name.split("+")
    return (rid, int(seq) if seq.isdigit() else -1, nonce)


def _decoded(line: str) -> dict:
    return decode_line(line.encode("utf-8", "surrogateescape").rstrip(b"\n"), "a pending change")


def _recovered(event: dict) -> bytes:
    event = dict(event)
    event["recovered"] = True
    return encode_line(event)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _complete_length(fd: int, *, repair: bool = False) -> int:
    """The length of a segment up to its last newline; ``repair`` truncates a torn tail there."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    pos = size
    while pos > 0:
        step = min(READ_CHUNK, pos)
        block = os.pread(fd, step, pos - step)
        nl = block.rfind(b"\n")
        if nl >= 0:
            pos = pos - step + nl + 1
            break
        pos -= step
    if repair:
        os.ftruncate(fd, pos)
        os.fdatasync(fd)
    return pos


def _read_segment(fd: int, seg: int, position: int, path: str):
    """Yield the events of one segment from ``position``; returns the position after the last
    complete line read."""
    off = position - seg
    buf = b""
    while True:
        data = os.pread(fd, READ_CHUNK, off + len(buf))
        if not data:
            return seg + off
        buf += data
        lines = buf.split(b"\n")
        buf = lines.pop()
        for line in lines:
            off += len(line) + 1
            yield seg + off, decode_line(line, f"{path}:{off - len(line) - 1}")
        if len(buf) > MAX_LINE:
            raise IntegrityError(f"event journal damaged at {path}:{off}: a line longer than {MAX_LINE} bytes", path=path)

