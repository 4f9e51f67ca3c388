"""`casruns serve`: regressions from a hostile review (auth, hostile input, DoS edges)."""

from __future__ import annotations

import base64
import os
import re
import socket
import time
from urllib.parse import urlsplit

import pytest

httpx = pytest.importorskip("httpx")

from webserve import Server, finished_run, write_tokens  # noqa: E402

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture
def ten_run(registry, tmp_path):
    return finished_run(registry, tmp_path, 'echo hello; printf 0123456789 > "$CASRUNS_ARTIFACTS_DIR/ten.txt"')


def raw(url: str, head: str) -> tuple[int, bytes]:
    """One request written byte for byte (``head`` without the final blank line)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall((head + "\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# -- DNS rebinding: an open (tokenless) loopback server answers only loopback host names ----------
def test_open_loopback_server_refuses_a_foreign_host_header(registry, ten_run):
    """A page on evil.example whose name is rebound to 127.0.0.1 must not read the registry."""
    with Server() as srv:
        port = urlsplit(srv.url).port
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", ""):
            status, body = raw(srv.url, f"GET /api/v1/runs HTTP/1.1\r\nHost: {host}")
            assert status in (400, 403, 421), (host, status)
            assert ten_run["run_id"].encode() not in body
            status, body = raw(srv.url, f"GET /runs/{ten_run['run_id']}/log/stdout HTTP/1.1\r\nHost: {host}")
            assert status in (400, 403, 421) and b"hello" not in body
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LOCALHOST:{port}"):
            status, body = raw(srv.url, f"GET /api/v1/runs HTTP/1.1\r\nHost: {host}")
            assert status == 200 and ten_run["run_id"].encode() in body, host


# -- a Range or page token with absurd numbers is a client error, never a 500 -----------------------
def test_range_with_thousands_of_digits_is_not_a_500(registry, ten_run):
    big = "9" * 5000
    url = f"/api/v1/runs/{ten_run['run_id']}/artifacts/ten.txt"
    with Server() as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.get(url, headers={"range": f"bytes={big}-"})
        assert r.status_code == 416 and r.headers["content-range"] == "bytes */10"
        r = c.get(url, headers={"range": f"bytes=2-{big}"})
        assert r.status_code == 206 and r.content == b"23456789"
        r = c.get(url, headers={"range": f"bytes=-{big}"})
        assert r.status_code == 206 and r.content == b"0123456789"
        assert c.get(url, headers={"range": "bytes=-0"}).status_code == 416
        r = c.get(url, headers={"range": "bytes=5-2"})  # invalid: ignored, the whole artifact
        assert r.status_code == 200 and r.content == b"0123456789"
        r = c.get(url, headers={"range": "bytes=0-1,3-4"})  # multiple ranges: not offered, the whole artifact
        assert r.status_code == 200 and r.content == b"0123456789"


def test_a_deeply_nested_page_token_is_400_not_500(registry, ten_run):
    deep = base64.urlsafe_b64encode(b"[" * 20000).decode().rstrip("=")
    with Server() as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.get("/api/v1/runs", params={"page": deep})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"
        r = c.get("/api/v1/runs", params={"page": "A" * 60000})
        assert r.status_code == 400


# -- a label with a dot keeps its whole name in a page session ---------------------------------------
def test_a_session_of_a_dotted_label_acts_as_that_label(registry, ten_run, tmp_path):
    tokens = write_tokens(tmp_path / "tokens", f"ci.bot:{TOKEN}\nci:other-token-0123456789abcdef\n")
    rid = ten_run["run_id"]
    with Server("--token-file", str(tokens), "--allow-actions") as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post("/login", data={"token": TOKEN, "next": f"/runs/{rid}"}, follow_redirects=False)
        assert r.status_code == 303
        page = c.get(f"/runs/{rid}").text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        r = c.post(f"/runs/{rid}/promote", data={"csrf": csrf, "reason": "release"}, follow_redirects=False)
        assert r.status_code == 303, r.text
    assert registry.get(rid)["retention"]["history"][-1]["by"] == "ci.bot"


# -- logout ends the session on the server, not only in this browser ---------------------------------
def test_a_session_cookie_replayed_after_logout_is_refused(registry, ten_run, tmp_path):
    tokens = write_tokens(tmp_path / "tokens", f"alice:{TOKEN}\n")
    with Server("--token-file", str(tokens)) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        c.post("/login", data={"token": TOKEN}, follow_redirects=False)
        stolen = c.cookies.get("casruns_session")
        assert stolen and c.get("/api/v1/runs").status_code == 200
        assert c.post("/logout", follow_redirects=False).status_code == 303
        with httpx.Client(base_url=srv.url, timeout=10, cookies={"casruns_session": stolen}) as replay:
            assert replay.get("/api/v1/runs").status_code == 401
            assert replay.get(f"/runs/{ten_run['run_id']}").status_code == 401
        c.post("/login", data={"token": TOKEN}, follow_redirects=False)  # a new login works
        assert c.cookies.get("casruns_session") != stolen and c.get("/api/v1/runs").status_code == 200


def test_token_files_that_are_symlinks_fifos_or_shared_are_refused(tmp_path):
    from casruns.errors import InvalidInput
    from casruns.web.auth import load_tokens

    good = write_tokens(tmp_path / "tokens", f"alice:{TOKEN}\n")
    assert load_tokens(str(good)) == {TOKEN: "alice"}
    link = tmp_path / "link"
    link.symlink_to(good)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    shared = write_tokens(tmp_path / "shared", f"alice:{TOKEN}\n")
    shared.chmod(0o640)
    for bad in (link, fifo, shared, tmp_path):
        with pytest.raises(InvalidInput):
            load_tokens(str(bad))


def test_localhost_is_bound_as_127_0_0_1_without_resolving(registry, monkeypatch):
    """A hosts file mapping localhost elsewhere must not make a tokenless server public."""
    import casruns.web.serve as serve_mod

    bound: list = []

    class FakeSocket:
        def __init__(self, *a, **k) -> None:
            pass

        def setsockopt(self, *a) -> None:
            pass

        def bind(self, addr) -> None:
            bound.append(addr)
            raise OSError(99, "stop here")

        def close(self) -> None:
            pass

    monkeypatch.setattr(serve_mod.socket, "socket", FakeSocket)
    from casruns.errors import InvalidInput

    with pytest.raises(InvalidInput):
        serve_mod.serve(registry, host="localhost", port=0)
    assert bound == [("127.0.0.1", 0)]


def test_event_streams_are_capped_with_503_busy(casruns_home):
    import httpx

    from conftest import cli
    from webserve import Server

    cli("init", check=0)
    with Server(env={"CASRUNS_SERVE_MAX_STREAMS": "2"}) as srv:
        with httpx.Client(timeout=10) as client:
            streams = [client.stream("GET", srv.url + "/api/v1/events") for _ in range(2)]
            opened = [s.__enter__() for s in streams]
            try:
                assert all(r.status_code == 200 for r in opened)
                third = client.get(srv.url + "/api/v1/events")
                assert third.status_code == 503 and third.headers["retry-after"] == "5"
                assert third.json()["error"]["code"] == "busy"
            finally:
                for s in streams:
                    s.__exit__(None, None, None)
