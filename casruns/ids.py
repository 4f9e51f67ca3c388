"""Identifiers and path safety: run ids, blob addresses, relative artifact paths.

Every identifier that comes from input is validated here *before* any code builds a path
from it. Nothing else in casruns joins untrusted strings onto registry paths.
"""

from __future__ import annotations

import os
import re
import time

from .errors import InvalidAddress, InvalidRunId, UnsafePath

# Crockford base32: no I, L, O, U. Generated ids are ULID-shaped: 48 bits of milliseconds
# then 80 random bits, so they sort by creation time and never collide in practice.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# Caller-chosen ids: a conservative charset that is safe as a file name on every platform
# and in a URL path, must start with an alphanumeric, at most 128 characters.
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ADDRESS_RE = re.compile(r"[0-9a-f]{64}")

MAX_REL_PATH = 4096


def new_run_id(now: float | None = None) -> str:
    """Return a new 26-character, time-sortable, globally unique run id."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is safe to use as a directory name, else raise InvalidRunId."""
    if not isinstance(run_id, str):
        raise InvalidRunId(f"run id must be a string, got {type(run_id).__name__}")
    if not _RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        shown = run_id if len(run_id) <= 80 else run_id[:77] + "..."
        raise InvalidRunId(
            f"invalid run id {shown!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'",
            run_id=shown,
        )
    return run_id


def validate_address(address: object) -> str:
    """Return ``address`` if it is a 64-character lowercase hex blake3 digest."""
    if not isinstance(address, str) or not _ADDRESS_RE.fullmatch(address):
        shown = str(address)[:80]
        raise InvalidAddress(f"invalid blob address {shown!r}: expected 64 lowercase hex characters")
    return address


def is_run_id(value: object) -> bool:
    """True if ``value`` would pass :func:`validate_run_id` (for listings that skip strays)."""
    return isinstance(value, str) and bool(_RUN_ID_RE.fullmatch(value)) and ".." not in value


def is_address(value: object) -> bool:
    """True if ``value`` is a 64-character lowercase hex blake3 digest."""
    return isinstance(value, str) and bool(_ADDRESS_RE.fullmatch(value))


def safe_relpath(path: object) -> str:
    """Normalize a relative POSIX path that must stay inside its base directory.

    Refuses absolute paths, ``..`` components, empty names, NUL bytes and backslashes
    (which another platform would read as separators). ``a//b/./c`` becomes ``a/b/c``.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath("empty artifact path")
    if "\x00" in path or "\\" in path:
        raise UnsafePath(f"artifact path {path[:80]!r} contains a NUL byte or a backslash")
    if len(path) > MAX_REL_PATH:
        raise UnsafePath(f"artifact path is longer than {MAX_REL_PATH} characters")
    if path.startswith("/"):
        raise UnsafePath(f"artifact path {path[:80]!r} is absolute")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafePath(f"artifact path {path[:80]!r} names no file")
    if any(p == ".." for p in parts):
        raise UnsafePath(f"artifact path {path[:80]!r} escapes its directory with '..'")
    return "/".join(parts)
