"""Following a run's live output: what ``casruns run`` prints while the run goes on.

While a run is active its supervisor appends each stream to a spool file in the run
directory; when it ends the output is stored as a blob and the spool removed. This module
tails the spools and hands out the bytes, so the command line never opens a run's files
itself. It imports no click.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from . import evidence, fsutil, notify, query
from .errors import StrayFile

if TYPE_CHECKING:
    from .root import RegistryRoot

POLL = notify.RECHECK  # the most seconds between two looks at a live run (a lost supervisor makes no event)


def follow_streams(
    registry: "RegistryRoot", run_id: str, streams: Iterable[str] = ("stdout", "stderr"), *, poll: float = POLL
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(stream, bytes)`` of a run's output as it is written, until the run is terminal.

    :param streams: the streams to tail, in the order they are read on each pass; empty to
        wait for the end without reading any output.
    :return: an iterator that ends once the run is terminal and every byte of each stream
        has been yielded. It sleeps on a watch of the spool and run directories
        (``notify``), so an append or a status change wakes it at once, and looks at the run
        at least every ``poll`` seconds anyway: through ``registry.get``, which reaps a run
        whose supervisor is lost, so it always ends.

    A stream whose spool was gone before it could be opened (the run ended first) is read
    from the run's stored log after the end instead. A spool opened in time is read to its
    end through the descriptor held open, even once the supervisor has removed its name.
    """
    streams = tuple(streams)
    run = registry.run_dir(run_id)
    fds: dict[str, int] = {}
    watch = notify.watch([run.spool_dir, run.path])  # before the first look: no change is missed
    try:
        while True:
            rec = query.get(registry, run_id)  # read before draining: a terminal run's spools are complete
            for stream in streams:
                if stream not in fds:
                    try:
                        fds[stream] = fsutil.open_regular(run.spool(stream))
                    except (FileNotFoundError, StrayFile):
                        continue  # not there (yet), or not a file to read: the stored log is read at the end
                while data := os.read(fds[stream], 1 << 16):
                    yield stream, data
            if rec["terminal"]:
                break
            watch.wait(poll)
    finally:
        watch.close()
        for fd in fds.values():
            os.close(fd)
    for stream in streams:
        if stream not in fds:  # it ended before we could tail it: read the stored log
            for chunk in evidence.log_chunks(registry, run_id, stream):
                yield stream, chunk
