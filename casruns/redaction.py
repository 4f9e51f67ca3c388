"""Streaming secret redaction: declared secret values never reach disk.

A :class:`StreamRedactor` sits between a command's output pipe and its spool file. It
replaces every occurrence of a secret (as raw bytes) with ``[REDACTED:<name>]`` and holds
back the last ``longest - 1`` bytes of what it has seen, so a secret split across two reads
is still caught. Memory is bounded by that holdback, whatever the output length.

Why no flush on idle: emitting a held-back prefix of a secret early would put the secret on
disk in two pieces that are adjacent in the file, which is the secret itself.

Values shorter than :data:`MIN_SECRET_LEN` or in :data:`COMMON_VALUES` are not treated as
secrets (masking every "1" in a log helps nobody); :func:`split_secrets` returns them so
the run's record can say so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MIN_SECRET_LEN = 6
COMMON_VALUES = frozenset({"true", "false", "null", "none", "yes", "no", "on", "off", "0", "1", "localhost"})


def split_secrets(secrets: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``{name: value}`` into (used, ignored-with-reason)."""
    used: dict[str, str] = {}
    ignored: dict[str, str] = {}
    for name, value in secrets.items():
        if value is None or len(value) < MIN_SECRET_LEN:
            ignored[name] = f"shorter than {MIN_SECRET_LEN} characters"
        elif value.strip().lower() in COMMON_VALUES:
            ignored[name] = "a common value"
        else:
            used[name] = value
    return used, ignored


class StreamRedactor:
    """Redacts a byte stream chunk by chunk. Call :meth:`feed` for each chunk, :meth:`close` at EOF."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        patterns: dict[bytes, bytes] = {}
        for name, value in secrets.items():
            raw = value.encode("utf-8", "surrogateescape")
            if raw:
                patterns.setdefault(raw, f"[REDACTED:{name}]".encode())
        self._map = patterns
        # Longest first, so when one secret contains another the longer one wins.
        ordered = sorted(patterns, key=len, reverse=True)
        self._re = re.compile(b"|".join(re.escape(p) for p in ordered)) if ordered else None
        self._hold = max((len(p) for p in patterns), default=1) - 1
        self._buf = b""
        self.count = 0  # redactions made

    def feed(self, chunk: bytes) -> bytes:
        if self._re is None:
            return chunk
        buf = self._buf + chunk
        safe_end = len(buf) - self._hold
        if safe_end <= 0:
            self._buf = buf
            return b""
        out = []
        pos = 0
        for m in self._re.finditer(buf):
            if m.start() >= safe_end:
                break
            out.append(buf[pos : m.start()])
            out.append(self._map[m.group()])
            self.count += 1
            pos = m.end()
        emit_end = max(pos, safe_end)
        out.append(buf[pos:emit_end])
        self._buf = buf[emit_end:]
        return b"".join(out)

    def close(self) -> bytes:
        if self._re is None:
            return b""
        buf, self._buf = self._buf, b""
        out, n = self._re.subn(lambda m: self._map[m.group()], buf)
        self.count += n
        return out


def redact_text(text: str, secrets: Mapping[str, str]) -> str:
    """Redact a whole string (error messages, argv, labels) with the same replacement."""
    r = StreamRedactor(secrets)
    raw = text.encode("utf-8", "surrogateescape")
    return (r.feed(raw) + r.close()).decode("utf-8", "replace")
