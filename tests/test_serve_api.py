"""`casruns serve`: the JSON API of spec/http.md, against a real server process (uvicorn)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

httpx = pytest.importorskip("httpx")

from conftest import ROOT, casruns_exe, cli_json, poll_until  # noqa: E402
from webserve import finished_run  # noqa: E402

TOKEN = "s3cret-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"


class Server:
    """``casruns serve --port 0 ARGS`` as a subprocess; its URL is read from stderr."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*casruns_exe(), "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
        )
        self.lines: list[str] = []
        self.url_found = threading.Event()
        self.url = None
        for pipe in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(pipe,), daemon=True).start()
        if not self.url_found.wait(20):
            self.proc.kill()
            raise AssertionError(f"server did not start: {self.output}")

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self.url_found.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(*args, **kw) -> Server:
        s = Server(*args, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture
def token_file(tmp_path):
    p = tmp_path / "tokens"
    p.write_text(f"# tokens\nci-bot:{TOKEN}\nalice:{OTHER}\n")
    p.chmod(0o600)
    return str(p)


ARTIFACTS = (
    'echo hello; echo oops >&2; a=$CASRUNS_ARTIFACTS_DIR; mkdir -p $a/sub; '
    'head -c 3000000 /dev/urandom > $a/sub/blob.bin; echo "<script>alert(1)</script>" > $a/page.html; '
    "echo '<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>' > $a/pic.svg; "
    "echo '{\"a\": 1}' > $a/data.json; printf 'caf\\303\\251' > \"$a/na me.txt\""
)


@pytest.fixture
def art_run(registry, tmp_path):
    return finished_run(registry, tmp_path, ARTIFACTS, labels={"team": "core"})


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """A request with its target sent exactly as given (no client-side normalization of '..')."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- reads ---------------------------------------------------------------------------------
def test_list_filters_and_paging_match_the_cli(registry, tmp_path, serve, validate):
    for i in range(7):
        registry.submit(["true"], labels={"team": "a" if i % 2 else "b", "n": str(i)}, run_id=f"run-{i}", spawn=False)
    registry.cancel("run-3")
    registry.promote("run-3", reason="kept")
    srv = serve()
    with httpx.Client(base_url=srv.url) as c:
        doc = validate(c.get("/api/v1/runs").json(), "list.schema.json")
        _, cli_out = cli_json("list")
        assert [r["run_id"] for r in doc["runs"]] == [r["run_id"] for r in cli_out[0]["runs"]]
        assert doc["next"] is None and re.fullmatch(r"\d{16}", doc["cursor"])
        # paging: every run once, in the same order
        seen, page = [], None
        while True:
            params = {"limit": 3, **({"page": page} if page else {})}
            d = validate(c.get("/api/v1/runs", params=params).json(), "list.schema.json")
            seen += [r["run_id"] for r in d["runs"]]
            page = d["next"]
            if not page:
                break
        assert seen == [r["run_id"] for r in doc["runs"]] and len(seen) == 7
        ids = lambda **p: [r["run_id"] for r in c.get("/api/v1/runs", params=p).json()["runs"]]  # noqa: E731
        assert ids(label="team=a") == ["run-5", "run-3", "run-1"]
        assert ids(status="cancelled") == ["run-3"]
        assert ids(promoted="true") == ["run-3"] and "run-3" not in ids(promoted="false")
        assert ids(q="RUN-4") == ["run-4"] and ids(q="team") == seen and ids(q="zz") == []
        assert ids(provider="shell") == seen and ids(provider="nope") == []
        assert set(ids(status=["cancelled", "queued"])) == set(seen)
        # NDJSON: one record per line
        r = c.get("/api/v1/runs", params={"limit": 2}, headers={"accept": "application/x-ndjson"})
        assert r.headers["content-type"].startswith("application/x-ndjson") and r.headers["x-casruns-next"]
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert [x["run_id"] for x in lines] == seen[:2]
        for x in lines:
            validate(x, "run.schema.json")
        assert c.get("/api/v1/runs", params={"format": "ndjson"}).text.count("\n") == 7
        for bad in ({"limit": 0}, {"limit": 1001}, {"page": "garbage!"}, {"status": "nope"}, {"label": "x"}, {"promoted": "maybe"}):
            r = c.get("/api/v1/runs", params=bad)
            assert r.status_code == 400, bad
            validate(r.json(), "error.schema.json")


def test_run_chain_and_artifact_tree(registry, art_run, serve, validate):
    rid = art_run["run_id"]
    srv = serve()
    with httpx.Client(base_url=srv.url) as c:
        run = validate(c.get(f"/api/v1/runs/{rid}").json(), "run.schema.json")
        assert run["run_id"] == rid and run["status"] == "succeeded"
        chain = validate(c.get(f"/api/v1/runs/{rid}/chain").json(), "list.schema.json")
        assert [r["run_id"] for r in chain["runs"]] == [rid]
        tree = validate(c.get(f"/api/v1/runs/{rid}/artifacts").json(), "reports.schema.json#/$defs/artifacts")
        _, cli_out = cli_json("artifacts", rid)
        assert tree == cli_out[0]
        r = c.get("/api/v1/runs/no-such-run")
        assert r.status_code == 404 and validate(r.json(), "error.schema.json")["error"]["code"] == "run_not_found"
        r = c.get("/api/v1/nothing-here")
        assert r.status_code == 404 and validate(r.json(), "error.schema.json")
        r = c.delete(f"/api/v1/runs/{rid}")
        assert r.status_code == 405 and "GET" in r.headers["allow"] and validate(r.json(), "error.schema.json")
        assert c.get("/healthz").json() == {"schema": "casruns/health/v1", "ok": True}


def test_artifact_download_is_byte_exact_with_etag_length_and_ranges(registry, art_run, serve, casruns_home):
    rid = art_run["run_id"]
    entries = {e.path: e.to_json() for e in registry.tree(rid).entries}
    blob = b"".join(registry.cat(rid, "sub/blob.bin"))
    srv = serve()
    with httpx.Client(base_url=srv.url) as c:
        url = f"/api/v1/runs/{rid}/artifacts/sub/blob.bin"
        r = c.get(url)
        assert r.status_code == 200 and r.content == blob
        assert r.headers["etag"] == f'"{entries["sub/blob.bin"]["blake3"]}"'
        assert r.headers["content-length"] == str(len(blob)) and r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith("attachment;")
        assert c.get(url, headers={"if-none-match": r.headers["etag"]}).status_code == 304
        assert c.get(url, headers={"if-none-match": '"other"'}).status_code == 200
        r = c.get(url, headers={"range": "bytes=100-1999"})
        assert r.status_code == 206 and r.content == blob[100:2000]
        assert r.headers["content-range"] == f"bytes 100-1999/{len(blob)}" and r.headers["content-length"] == "1900"
        r = c.get(url, headers={"range": "bytes=-10"})
        assert r.status_code == 206 and r.content == blob[-10:]
        r = c.get(url, headers={"range": f"bytes={len(blob) - 5}-"})
        assert r.status_code == 206 and r.content == blob[-5:]
        r = c.get(url, headers={"range": f"bytes={len(blob)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(blob)}"
        r = c.get(url, headers={"range": "bytes=5-9", "if-range": '"stale"'})
        assert r.status_code == 200 and r.content == blob
        r = c.get(f"/api/v1/runs/{rid}/artifacts/na%20me.txt")
        assert r.content == "café".encode() and "filename*=UTF-8''na%20me.txt" in r.headers["content-disposition"]
        r = c.get(f"/api/v1/runs/{rid}/artifacts/data.json", params={"inline": "1"})
        assert r.headers["content-disposition"].startswith("inline;") and "sandbox" in r.headers["content-security-policy"]
        r = c.get(f"/api/v1/runs/{rid}/artifacts/sub")
        assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_not_found"


def test_a_blob_found_corrupt_mid_stream_aborts_the_download(registry, art_run, serve):
    rid = art_run["run_id"]
    entry = registry.tree(rid).get("sub/blob.bin")
    path = registry.store.path_for(entry.blake3)
    data = bytearray(Path(path).read_bytes())
    os.chmod(path, 0o644)
    data[len(data) // 2] ^= 0xFF  # the frame still decodes (raw blocks): only the hash tells
    Path(path).write_bytes(bytes(data))
    srv = serve()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        with pytest.raises(httpx.HTTPError):
            with c.stream("GET", f"/api/v1/runs/{rid}/artifacts/sub/blob.bin") as r:
                assert r.status_code == 200 and r.headers["content-length"] == str(entry.size)
                got = b"".join(r.iter_bytes())
                assert len(got) < entry.size  # only reached if the client did not notice itself
        assert c.get("/healthz").status_code == 200  # the server carries on
        r = c.get(f"/api/v1/runs/{rid}/artifacts/sub/blob.bin", headers={"range": "bytes=0-9"})
        assert r.status_code >= 500 or len(r.content) < 10


@pytest.mark.parametrize("path", ["page.html", "pic.svg"])
def test_html_and_svg_never_run_in_the_apps_origin(registry, art_run, serve, path):
    srv = serve()
    with httpx.Client(base_url=srv.url) as c:
        for params in ({}, {"inline": "1"}):
            r = c.get(f"/api/v1/runs/{art_run['run_id']}/artifacts/{path}", params=params)
            assert r.status_code == 200 and b"<script>" in r.content
            assert r.headers["content-disposition"].startswith("attachment;")
            assert r.headers["content-security-policy"].startswith("sandbox")
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers.get_list("content-security-policy") == [r.headers["content-security-policy"]]


def test_traversal_is_refused_and_nothing_outside_is_read(registry, art_run, serve, tmp_path, casruns_home):
    rid = art_run["run_id"]
    secret = tmp_path / "outside.txt"
    secret.write_text("OUTSIDE-SECRET")
    srv = serve()
    targets = [
        f"/api/v1/runs/{rid}/artifacts/../../../outside.txt",
        f"/api/v1/runs/{rid}/artifacts/%2e%2e/%2e%2e/outside.txt",
        f"/api/v1/runs/{rid}/artifacts/sub/%2E%2E/%2E%2E/%2E%2E/outside.txt",
        f"/api/v1/runs/{rid}/artifacts/%2Fetc%2Fpasswd",
        f"/api/v1/runs/{rid}/artifacts//etc/passwd",
        f"/api/v1/runs/{rid}/artifacts/{secret}",
        f"/api/v1/runs/{rid}/artifacts/sub%5C..%5C..%5Coutside.txt",
        "/api/v1/runs/../../outside.txt",
        "/api/v1/runs/%2e%2e/artifacts",
        "/api/v1/runs/%2e%2e%2f%2e%2e/artifacts/x",
        "/api/v1/runs/..%2Fruns/chain",
        "/api/v1/runs/a..b/logs/stdout",
        f"/api/v1/runs/{rid}/logs/..%2f..%2fconfig.toml",
    ]
    for t in targets:
        status, body = raw_get(srv.url, t)
        assert status in (400, 404), (t, status, body[:200])
        assert b"OUTSIDE-SECRET" not in body and b"root:" not in body
        if body.startswith(b"{"):
            assert json.loads(body)["error"]["code"] in ("unsafe_path", "invalid_run_id", "artifact_not_found", "usage", "run_not_found", "invalid_input")


def test_logs_with_offset_and_live_follow(registry, art_run, serve, tmp_path):
    rid = art_run["run_id"]
    srv = serve()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.get(f"/api/v1/runs/{rid}/logs/stdout")
        assert r.text == "hello\n" and r.headers["x-casruns-offset"] == "0" and r.headers["content-type"] == "text/plain; charset=utf-8"
        assert c.get(f"/api/v1/runs/{rid}/logs/stdout", params={"offset": 2}).text == "llo\n"
        assert c.get(f"/api/v1/runs/{rid}/logs/stderr").text == "oops\n"
        assert c.get(f"/api/v1/runs/{rid}/logs/stdout", params={"offset": 99}).text == ""
        assert c.get(f"/api/v1/runs/{rid}/logs/stdout", params={"offset": -1}).status_code == 400
        assert c.get(f"/api/v1/runs/{rid}/logs/nope").json()["error"]["code"] == "invalid_input"
        ws = tmp_path / "live"
        ws.mkdir()
        live = registry.submit(["sh", "-c", "echo one; sleep 1.5; echo two; sleep 0.5; echo three"], cwd=str(ws))["run_id"]
        poll_until(lambda: registry.get(live)["status"] == "running", what="running")
        t0 = time.monotonic()
        with c.stream("GET", f"/api/v1/runs/{live}/logs/stdout", params={"follow": 1}) as r:
            assert r.headers["x-casruns-status"] in ("running", "booting")
            got = b"".join(r.iter_bytes())
        assert got == b"one\ntwo\nthree\n" and time.monotonic() - t0 > 1.0
        assert registry.get(live)["terminal"]
        # follow from an offset, on a finished run: the rest, then the end
        assert c.get(f"/api/v1/runs/{live}/logs/stdout", params={"follow": 1, "offset": 4}).text == "two\nthree\n"


# -- events --------------------------------------------------------------------------------
def read_sse(response, n: int, timeout: float = 20) -> list[dict]:
    """``n`` SSE messages (dicts of their fields; ``data`` parsed) from a streaming response."""
    out, cur = [], {}
    deadline = time.monotonic() + timeout
    if not hasattr(response, "_lines"):
        response._lines = response.iter_lines()  # one iterator per response: read on where we stopped
    for line in response._lines:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out with {out}")
        if line == "":
            if cur:
                if "data" in cur:
                    cur["data"] = json.loads(cur["data"])
                out.append(cur)
                cur = {}
                if len([m for m in out if "event" in m]) >= n:
                    return [m for m in out if "event" in m]
            continue
        if line.startswith(":"):
            continue
        k, _, v = line.partition(": ")
        cur[k] = v
    return [m for m in out if "event" in m]


def test_sse_live_resume_without_gaps_or_duplicates(registry, serve, validate):
    srv = serve()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("GET", "/api/v1/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            time.sleep(0.3)
            ids = [registry.submit(["true"], spawn=False, run_id=f"ev-{i}")["run_id"] for i in range(3)]
            msgs = read_sse(r, 3)
        assert [m["data"]["run_id"] for m in msgs] == ids and all(m["event"] == "created" for m in msgs)
        for m in msgs:
            assert m["id"] == m["data"]["cursor"]
            validate(m["data"], "event.schema.json")
        # resume with Last-Event-ID while changes keep coming: the journal, then live, exactly once
        for rid in ids:
            registry.cancel(rid)
        expected = [e["cursor"] for e in registry.events(since=msgs[0]["id"])]
        with c.stream("GET", "/api/v1/events", headers={"last-event-id": msgs[0]["id"]}) as r:
            got = read_sse(r, len(expected))
            more = [registry.submit(["true"], spawn=False)["run_id"] for _ in range(2)]
            got += read_sse(r, 2)
        assert [m["id"] for m in got[: len(expected)]] == expected
        assert [m["data"]["run_id"] for m in got[len(expected):]] == more
        assert len({m["id"] for m in got}) == len(got) and [m["id"] for m in got] == sorted(m["id"] for m in got)
        # the same with ?since= and filters
        with c.stream("GET", "/api/v1/events", params={"since": msgs[0]["id"], "run": "ev-2", "type": "cancelled"}) as r:
            got = read_sse(r, 1)
        assert got[0]["data"]["run_id"] == "ev-2" and got[0]["data"]["new_status"] == "cancelled"
        r = c.get("/api/v1/events", params={"type": "bogus"})
        assert r.status_code == 400 and validate(r.json(), "error.schema.json")
        r = c.get("/api/v1/events", params={"since": "9" * 16})
        assert r.status_code == 400


def test_a_subscriber_that_falls_behind_is_cut_off_not_grown():
    import asyncio

    from casruns.web import hub as hub_mod

    async def scenario():
        sub = hub_mod.Subscriber(types=["created"])
        event = {"type": "created", "run_id": "r", "run": {"labels": {}}}
        for i in range(hub_mod.BUFFER):
            sub.offer(f"{i:016d}", event, "{}")
        sub.offer("x", {"type": "status", "new_status": "running"}, "{}")  # filtered out: not counted
        assert len(sub.items) == hub_mod.BUFFER and not sub.overflowed
        sub.offer(f"{hub_mod.BUFFER:016d}", event, "{}")
        assert sub.overflowed and not sub.items and sub.ready.is_set()
        sub.offer("more", event, "{}")
        assert not sub.items

    asyncio.run(scenario())


def test_sse_expired_cursor_is_410(casruns_home, registry, serve, monkeypatch, validate):
    monkeypatch.setenv("CASRUNS_EVENTS_SEGMENT_BYTES", "4096")
    for _ in range(12):
        registry.cancel(registry.submit(["true"], spawn=False)["run_id"])
    first = next(iter(registry.events(from_start=True)))["cursor"]
    from casruns.runs import journal_of

    j = journal_of(registry.runs_dir)
    old = time.time() - 8 * 86400
    for s in j.segments()[:-1]:
        os.utime(j.segment_path(s), (old, old))
    cli_json("gc", check=0)
    srv = serve()
    with httpx.Client(base_url=srv.url) as c:
        r = c.get("/api/v1/events", headers={"last-event-id": first})
        assert r.status_code == 410
        assert validate(r.json(), "error.schema.json")["error"]["code"] == "cursor_expired"


def test_disconnecting_clients_cost_nothing(registry, serve, tmp_path):
    srv = serve()
    ws = tmp_path / "quiet"
    ws.mkdir()
    quiet = registry.submit(["sh", "-c", "echo start; sleep 60"], cwd=str(ws))["run_id"]
    poll_until(lambda: registry.get(quiet)["status"] == "running", what="running")
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        c.get("/healthz")
        baseline = srv.threads()
    fds = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
    for _ in range(3):
        clients = [httpx.Client(base_url=srv.url, timeout=10) for _ in range(50)]
        streams = []
        for i, cl in enumerate(clients):
            path = "/api/v1/events" if i % 2 else f"/api/v1/runs/{quiet}/logs/stdout?follow=1"
            cm = cl.stream("GET", path)
            streams.append((cm, cm.__enter__()))
        for cm, r in streams:
            cm.__exit__(None, None, None)
        for cl in clients:
            cl.close()
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        t0 = time.monotonic()
        for _ in range(20):
            assert c.get(f"/api/v1/runs/{quiet}").status_code == 200
        assert time.monotonic() - t0 < 5
    # 75 log followers of a quiet run came and went: had any kept a worker thread, the 40 of
    # anyio's limiter would be gone and the requests above would have hung. Every spool file
    # and socket they opened is closed again, and no thread is left beyond anyio's idle pool.
    poll_until(lambda: len(os.listdir(f"/proc/{srv.proc.pid}/fd")) <= fds + 2, timeout=10, what="fds back down")
    assert srv.threads() <= baseline + 41
    registry.cancel(quiet)
    assert srv.stop() == 0


# -- tokens, actions, shutdown -------------------------------------------------------------
def test_a_request_does_not_wait_for_a_delayed_ack(registry, serve):
    """Headers and body are two writes: without TCP_NODELAY each response took ~40 ms."""
    srv = serve()
    with httpx.Client(base_url=srv.url) as c:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 0.025


def test_non_loopback_without_token_refuses_to_start():
    proc = subprocess.run([*casruns_exe(), "serve", "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "token" in proc.stderr
    proc = subprocess.run([*casruns_exe(), "serve", "--allow-actions", "--port", "0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3


def test_a_token_file_open_to_others_is_refused(tmp_path):
    p = tmp_path / "tokens"
    p.write_text(f"ci:{TOKEN}\n")
    p.chmod(0o644)
    proc = subprocess.run([*casruns_exe(), "serve", "--port", "0", "--token-file", str(p)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "chmod 600" in proc.stderr and TOKEN not in proc.stderr + proc.stdout


def test_with_a_token_every_api_route_needs_it(registry, art_run, serve, token_file, validate):
    rid = art_run["run_id"]
    srv = serve("--token-file", token_file, "--host", "0.0.0.0")
    base = srv.url.replace("0.0.0.0", "127.0.0.1")
    paths = ["/api/v1/runs", f"/api/v1/runs/{rid}", f"/api/v1/runs/{rid}/chain", f"/api/v1/runs/{rid}/artifacts",
             f"/api/v1/runs/{rid}/artifacts/data.json", f"/api/v1/runs/{rid}/logs/stdout", "/api/v1/events?since=0000000000000000&type=bogus"]
    with httpx.Client(base_url=base, timeout=10) as c:
        for p in paths:
            r = c.get(p)
            assert r.status_code == 401, p
            assert validate(r.json(), "error.schema.json")["error"]["code"] == "unauthorized"
            assert c.get(p, headers={"authorization": "Bearer wrong-token-0123456789"}).status_code == 401
            ok = c.get(p, headers={"authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == (400 if "bogus" in p else 200), p
        assert c.get("/healthz").status_code == 200
    srv.stop()
    assert TOKEN not in srv.output and OTHER not in srv.output


def test_actions_need_allow_actions_a_token_and_csrf(registry, art_run, serve, token_file, validate):
    rid = art_run["run_id"]
    auth = {"authorization": f"Bearer {TOKEN}"}
    srv = serve("--token-file", token_file)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post(f"/api/v1/runs/{rid}/promote", json={"reason": "x"}, headers=auth)
        assert r.status_code == 403 and validate(r.json(), "error.schema.json")["error"]["code"] == "forbidden"
    srv.stop()
    srv = serve("--token-file", token_file, "--allow-actions")
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.post(f"/api/v1/runs/{rid}/promote", json={"reason": "x"}).status_code == 401
        r = c.get(f"/api/v1/runs/{rid}/promote", headers=auth)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert c.post(f"/api/v1/runs/{rid}/promote", json={"reason": ""}, headers=auth).status_code == 400
        r = c.post(f"/api/v1/runs/{rid}/promote", json={"reason": "release evidence"}, headers=auth)
        doc = validate(r.json(), "reports.schema.json#/$defs/promotion")
        assert r.status_code == 200 and doc["outcome"] == "promoted"
        _, out = cli_json("status", rid)
        ret = out[0]["retention"]
        assert ret["promoted"] and ret["promoted_by"] == "ci-bot" and ret["promotion_reason"] == "release evidence"
        r = c.post(f"/api/v1/runs/{rid}/unpromote", json={"reason": "oops"}, headers={"authorization": f"Bearer {OTHER}"})
        assert r.json()["outcome"] == "unpromoted"
        assert registry.get(rid)["retention"]["history"][-1]["by"] == "alice"
        r = c.post(f"/api/v1/runs/{rid}/retain", json={"for": "30d"}, headers=auth)
        assert validate(r.json(), "run.schema.json")["retention"]["retain_for"] == 30 * 86400
        assert c.post(f"/api/v1/runs/{rid}/retain", json={}, headers=auth).status_code == 400
        queued = registry.submit(["true"], spawn=False)["run_id"]
        r = c.post(f"/api/v1/runs/{queued}/cancel", json={"reason": "not needed"}, headers=auth)
        assert validate(r.json(), "reports.schema.json#/$defs/cancel")["outcome"] == "cancelled"
        assert c.post(f"/api/v1/runs/{rid}/promote", content=b"[1]", headers=auth).status_code == 400
        # a cookie session (the pages' login) cannot POST to the API without the CSRF header
        session = srv_session(c)
        if session:
            r = c.post(f"/api/v1/runs/{rid}/promote", json={"reason": "csrf"}, cookies={"casruns_session": session})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def srv_session(client) -> str | None:
    """A session cookie from POST /login, when the pages offer it (another part of the app)."""
    r = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    return r.cookies.get("casruns_session") or client.cookies.get("casruns_session")


def test_cookie_authenticated_api_posts_need_the_csrf_header(registry, art_run):
    """In-process uvicorn (the login page belongs to the pages): a valid session cookie alone is refused."""
    import uvicorn

    from casruns.web.app import build_app

    app = build_app(registry, tokens={TOKEN: "ci-bot"}, allow_actions=True)
    cookie = app.ctx.auth.new_session("ci-bot")
    rid = art_run["run_id"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    poll_until(lambda: server.started, what="in-process server")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", cookies={"casruns_session": cookie}) as c:
            assert c.get(f"/api/v1/runs/{rid}").status_code == 200  # reading with the cookie is fine
            r = c.post(f"/api/v1/runs/{rid}/promote", json={"reason": "x"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            r = c.post(f"/api/v1/runs/{rid}/promote", json={"reason": "x"}, headers={"x-csrf-token": "0" * 64})
            assert r.status_code == 403
            r = c.post(f"/api/v1/runs/{rid}/promote", json={"reason": "x"}, headers={"x-csrf-token": app.ctx.auth.csrf_token(cookie)})
            assert r.status_code == 200 and registry.get(rid)["retention"]["promoted_by"] == "ci-bot"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_sigterm_stops_cleanly_with_an_sse_client_connected(registry, serve):
    srv = serve()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("GET", "/api/v1/events") as r:
            registry.submit(["true"], spawn=False)
            assert read_sse(r, 1)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(10) == 0
            assert time.monotonic() - t0 < 4
    assert "Traceback" not in srv.output


def test_http_status_table_in_the_spec_matches_the_app():
    from casruns.web.app import HTTP_STATUS

    text = (ROOT / "spec" / "http.md").read_text()
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", section, re.M))
    assert {k: int(v) for k, v in rows.items()} == HTTP_STATUS


def test_serve_stays_off_the_status_import_path(registry):
    proc = subprocess.run([os.sys.executable, "-X", "importtime", "-m", "casruns", "status", "nope"], capture_output=True, text=True)
    for mod in ("starlette", "uvicorn", "jinja2", "httpx"):
        assert not re.search(rf"\|\s+{mod}(\.|$)", proc.stderr, re.M), mod
