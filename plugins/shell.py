"""The built-in ``shell`` provider: runs the command directly on this machine.

It boots nothing; it records where the command ran so a run's record says so.
"""

from __future__ import annotations

import platform
import socket

from casruns.hookspecs import RunContext
from casruns.plugins import hookimpl

PROVIDER = "shell"


@hookimpl
def casruns_providers() -> list[str]:
    return [PROVIDER]


@hookimpl
def casruns_boot(run: RunContext) -> dict | None:
    if run.provider != PROVIDER:
        return None
    return {"runtime": {"kind": "shell", "host": socket.gethostname(), "platform": platform.platform()}}
