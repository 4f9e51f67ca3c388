"""One follower of the event journal for every Server-Sent Events client (spec/http.md, "Events").

A thread per SSE client would not scale (anyio lends at most 40 worker threads, shared with every
other request), so the server runs ONE background thread that follows the journal from where it
stood when the server started and hands each event, serialized once, to the event loop, which
appends it to every subscriber's bounded buffer. A subscriber whose buffer overflows (a client
reading slower than the registry changes) is marked and ends its stream with an error event: the
server never grows memory for a slow reader. A client resuming from an older cursor subscribes
first, then replays the journal from its cursor in a worker thread (a bounded batch per call), then
takes the live events whose cursor is past the last replayed one: no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque

from ..events import matches

BUFFER = 2048  # events a subscriber may have waiting before it is cut off
REPLAY_BATCH = 256  # events read from the journal per worker-thread call while replaying
FOLLOW_SLICE = 1.0  # seconds the hub thread follows before it looks at its stop flag


def dump(event: dict) -> str:
    """An event as the CLI prints it (compact, UTF-8), which is the SSE ``data:`` line."""
    text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=True)
    return text


class Subscriber:
    """One SSE client's buffer: (cursor, type, data) tuples, filled on the event loop."""

    def __init__(self, *, run_ids=(), labels=None, types=()) -> None:
        self.run_ids, self.labels, self.types = set(run_ids), dict(labels or {}), set(types)
        self.items: deque[tuple[str, str, str]] = deque()
        self.ready = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, cursor: str, event: dict, data: str) -> None:
        if self.overflowed or self.closed or not matches(event, run_ids=self.run_ids, labels=self.labels, types=self.types):
            return
        if len(self.items) >= BUFFER:
            self.overflowed = True
            self.items.clear()  # the client is cut off: free what it did not read
        else:
            self.items.append((cursor, event.get("type") or "event", data))
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    def take(self) -> list[tuple[str, str, str]]:
        items = list(self.items)
        self.items.clear()
        self.ready.clear()
        return items


class Hub:
    """The journal follower shared by every SSE client of one server."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.subscribers: set[Subscriber] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.error: Exception | None = None
        self.delivered = 0  # events the thread handed over (tests and benchmarks read it)
        from .index import RunIndex

        self.index = RunIndex(registry)  # the runs page's table, kept current by this follower

    # -- lifecycle (the app's lifespan) --------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        cursor = await asyncio.to_thread(self._start_cursor)
        self.thread = threading.Thread(target=self._follow, args=(cursor,), name="casruns-events-hub", daemon=True)
        self.thread.start()

    def _start_cursor(self) -> str | None:
        return self.registry.events_cursor() if self.registry.check_format() else None

    def close_clients(self) -> None:
        """Ask every stream to end now (SIGTERM): thread-safe, callable from a signal handler."""
        self.stopping.set()
        self._call(self._close_all)

    def _close_all(self) -> None:
        for sub in list(self.subscribers):
            sub.close()

    async def stop(self) -> None:
        self.stopping.set()
        self._close_all()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, FOLLOW_SLICE + 1.0)

    # -- the one follower thread --------------------------------------------------------
    def _follow(self, cursor: str | None) -> None:
        reg = self.registry
        while not self.stopping.is_set():
            try:
                if cursor is None:  # no registry yet: wait for one to appear
                    if self.stopping.wait(FOLLOW_SLICE):
                        return
                    cursor = self._start_cursor()
                    continue
                if not self.index.ready:
                    self.index.rebuild()  # after the cursor was fixed: the events since are applied on top
                    self.index.at(cursor)
                for event in reg.events(since=cursor, follow=True, timeout=FOLLOW_SLICE):
                    cursor = event["cursor"]
                    self.index.apply(event)
                    self._publish(event)
                    if self.stopping.is_set():
                        return
            except Exception as e:  # an expired cursor (gc while we slept), a damaged line, I/O...
                self.error = e
                self.index.invalidate()  # it may have missed events: rebuilt from a new snapshot
                # carry on from the end; every client is cut off (an error event naming its last
                # cursor), so none silently misses what the hub skipped: each resumes from the journal
                self._call(self._cut_all)
                if self.stopping.wait(FOLLOW_SLICE):
                    return
                cursor = self._start_cursor()

    def _publish(self, event: dict) -> None:
        self.delivered += 1
        self._call(self._dispatch, event["cursor"], event, dump(event))

    def _call(self, fn, *args) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _cut_all(self) -> None:
        for sub in self.subscribers:
            sub.overflowed = True
            sub.items.clear()
            sub.ready.set()

    def _dispatch(self, cursor: str, event: dict, data: str) -> None:
        for sub in self.subscribers:
            sub.offer(cursor, event, data)

    # -- subscribers (on the event loop) --------------------------------------------------
    def subscribe(self, **filters) -> Subscriber:
        sub = Subscriber(**filters)
        if self.stopping.is_set():
            sub.close()
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        sub.items.clear()
