"""Who may do what: tokens, the page session cookie, CSRF tokens (spec/http.md, "Security").

A token file holds one token per line, ``LABEL:TOKEN`` (``#`` starts a comment). The label is
who a request acts as: actions are recorded with ``--by LABEL``, as the CLI records them. The
file must be a regular file private to its owner (0600 or stricter); tokens are at least 16
characters. Tokens are compared in constant time and never logged or echoed.

Pages authenticate with a cookie set by ``POST /login`` (HttpOnly, SameSite=Strict, Path=/):
``<label>.<nonce>.<hmac>`` signed with a secret made when the server starts (so a restart ends
every session). A form that changes something carries a CSRF token derived from the session.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat

from ..errors import InvalidInput

COOKIE = "casruns_session"
LABEL_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_TOKEN = 16


def load_tokens(path: str) -> dict[str, str]:
    """token -> label, from a private token file; InvalidInput naming the problem otherwise."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise InvalidInput(f"cannot read token file {path}: {e.strerror}", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"token file {path} is not a regular file", path=path)
    if st.st_mode & 0o077:
        raise InvalidInput(f"token file {path} is readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it", path=path)
    try:  # no symlink swapped in since the lstat; the file read is the file checked
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InvalidInput(f"cannot read token file {path}: {e.strerror}", path=path) from None
    with open(fd, encoding="utf-8") as f:
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st2.st_mode) or st2.st_mode & 0o077:
            raise InvalidInput(f"token file {path} changed while it was read", path=path)
        text = f.read(1 << 20)
    tokens: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, token = line.partition(":")
        if not sep or not LABEL_RE.fullmatch(label):
            raise InvalidInput(f"token file {path} line {n}: expected LABEL:TOKEN with a label of letters, digits, '.', '_' or '-'", path=path)
        if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
            raise InvalidInput(f"token file {path} line {n}: a token must be at least {MIN_TOKEN} characters without spaces", path=path)
        tokens[token] = label
    if not tokens:
        raise InvalidInput(f"token file {path} holds no token", path=path)
    return tokens


class Auth:
    """The server's tokens (None: an open, loopback-only server) and its signing secret."""

    def __init__(self, tokens: dict[str, str] | None) -> None:
        self.tokens = tokens
        self.secret = secrets.token_bytes(32)
        self.ended: set[str] = set()  # the MACs of sessions ended by POST /logout (a copy replayed later is refused)

    @property
    def required(self) -> bool:
        return self.tokens is not None

    def label_for_token(self, token: str | None) -> str | None:
        if not token or self.tokens is None:
            return None
        found = None
        for known, label in self.tokens.items():  # every token compared: no early exit on a match
            if hmac.compare_digest(known.encode(), token.encode()):
                found = label
        return found

    def bearer(self, header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        return self.label_for_token(value.strip()) if scheme.lower() == "bearer" else None

    def _sign(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    def new_session(self, label: str) -> str:
        body = f"{label}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign(body)}"

    def session_label(self, cookie: str | None) -> str | None:
        if not cookie or cookie.count(".") < 2:
            return None
        body, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(self._sign(body), mac) or mac in self.ended:
            return None
        return body.rsplit(".", 1)[0]  # the nonce holds no dot; a label may

    def end_session(self, cookie: str | None) -> None:
        """Log out: this session is refused from now on (until the server restarts, when every
        session ends anyway). Only a valid session is remembered, so the set grows only by logouts."""
        if self.session_label(cookie) is not None:
            self.ended.add(cookie.rpartition(".")[2])

    def csrf_token(self, cookie: str | None) -> str:
        return self._sign("csrf:" + (cookie or ""))

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        return bool(cookie) and bool(token) and hmac.compare_digest(self.csrf_token(cookie), token or "")
