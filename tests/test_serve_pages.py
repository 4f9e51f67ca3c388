"""The HTML pages of ``casruns serve`` (spec/http-pages.md), over HTTP against a real server."""

from __future__ import annotations

import json
import re
import sys
from urllib.parse import quote

import pytest

httpx = pytest.importorskip("httpx")
markupsafe = pytest.importorskip("markupsafe")

from conftest import cli, cli_json  # noqa: E402
from webserve import LABEL, TOKEN, XSS, XSS_NAMES, Server, write_plugin, write_tokens  # noqa: E402

HOSTILE_SCRIPT = '''
import os, sys
payloads = {payloads!r}
names = {names!r}
for p in payloads:
    print(p)
    print("err " + p, file=sys.stderr)
d = os.environ["CASRUNS_ARTIFACTS_DIR"]
os.makedirs(d, exist_ok=True)
for n in names:
    with open(os.path.join(d, n), "w") as f:
        f.write("\\n".join(payloads) + "\\n")
with open(os.path.join(d, "page.html"), "w") as f:
    f.write("<html><body><script>alert(document.cookie)</script><svg onload=alert(2)></svg></body></html>")
with open(os.path.join(d, "blob.bin"), "wb") as f:
    f.write(bytes(range(256)))
'''


def assert_inert(html: str, payloads=XSS) -> None:
    """Every payload is in the page as text only; the page has no script but app.js."""
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']
    assert re.search(r"<[a-zA-Z][^>]*\son[a-z]+\s*=", html) is None, "an event handler attribute made it into the markup"
    assert "javascript:" not in " ".join(re.findall(r'(?:href|src|action)="[^"]*"', html)).lower()
    for p in payloads:
        if any(c in p for c in "<>\"'"):
            assert p not in html, f"raw payload in the page: {p}"


def escaped(p: str) -> str:
    return str(markupsafe.escape(p))


@pytest.fixture
def server(casruns_home):
    cli("init", check=0)
    with Server() as s:
        yield s


def submit(*args, env=None) -> str:
    proc, lines = cli_json("submit", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return lines[0]["run_id"]


def wait(*rids) -> None:
    proc = cli("wait", *rids, "--timeout", "60")
    assert proc.returncode != 13, "runs did not finish"


@pytest.fixture
def hostile(tmp_path, casruns_home, monkeypatch):
    """A finished run with hostile labels, logs, artifact names and contents, runtime and preview."""
    cli("init", check=0)
    plug = write_plugin(tmp_path / "plug")
    monkeypatch.setenv("PYTHONPATH", str(plug))
    monkeypatch.setenv("CASRUNS_PLUGINS", "hostileplug")
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE_SCRIPT.format(payloads=XSS, names=XSS_NAMES))
    boot = {"runtime": {"id": XSS[0], "note": XSS[1], "nested": {"k": XSS[3]}},
            "preview": {"url": "javascript:alert(1)", "expires_at": XSS[2], "extra": XSS[4]}}
    labels = [a for i, p in enumerate(XSS) for a in ("--label", f"k{i}={p}")]
    rid = submit("--provider", "hostile", "--env", "HOSTILE_BOOT=" + json.dumps(boot), *labels,
                 "--", sys.executable, str(script), XSS[0])
    wait(rid)
    cli("promote", rid, "--reason", XSS[1], "--by", "tester", check=0)
    return rid


# -- the runs page -------------------------------------------------------------------------------


def test_runs_page_lists_newest_first_with_counts_and_filters(server, tmp_path):
    a = submit("--label", "team=red", "--", "true")
    b = submit("--label", "team=blue", "--", "sh", "-c", "exit 3")
    wait(a, b)
    cli("promote", a, "--reason", "good", check=0)
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert html.index(b) < html.index(a)  # newest first
    assert re.search(r'data-count="succeeded">1<', html) and re.search(r'data-count="failed">1<', html)
    assert 'id="runs" data-events="/api/v1/events?since=' in html

    def ids(**params):
        return re.findall(r'<tr data-run="([^"]+)"', httpx.get(server.url + "/", params=params).text)

    assert ids() == [b, a]
    assert ids(status="failed") == [b]
    assert ids(label="team=red") == [a]
    assert ids(promoted="yes") == [a] and ids(promoted="no") == [b]
    assert ids(provider="shell") == [b, a] and ids(provider="other") == []
    assert ids(q="BLUE") == [b] and ids(q=a[-6:].lower()) == [a]
    assert httpx.get(server.url + "/", params={"status": "bogus"}).status_code == 400
    bad = httpx.get(server.url + "/", params={"label": "<script>x</script>"})
    assert bad.status_code == 400 and "<script>x" not in bad.text


def test_runs_page_paginates_past_100_rows(casruns_home):
    from casruns import Registry

    reg = Registry(casruns_home)
    reg.init()
    rids = [reg.submit(["true"], spawn=False, labels={"n": str(i)})["run_id"] for i in range(105)]
    with Server() as s:
        first = httpx.get(s.url + "/").text
        rows = re.findall(r'<tr data-run="([^"]+)"', first)
        assert len(rows) == 100 and rows[0] == rids[-1]
        assert "page 1 of 2" in first and 'rel="next" href="?page=2"' in first
        second = httpx.get(s.url + "/?page=2").text
        assert re.findall(r'<tr data-run="([^"]+)"', second) == list(reversed(rids[:5]))
        assert 'rel="prev" href="?page=1"' in second
        assert 'data-live-insert="0"' in second and 'data-live-insert="1"' in first
        filtered = httpx.get(s.url + "/", params={"label": "n=7"}).text
        assert re.findall(r'<tr data-run="([^"]+)"', filtered) == [rids[7]]


# -- the run page --------------------------------------------------------------------------------


def test_run_page_shows_the_record_timeline_logs_and_artifacts(server, tmp_path):
    rid = submit("--label", "k=v", "--", "sh", "-c",
                 'i=0; while [ $i -lt 3000 ]; do echo "line $i of a long log"; i=$((i+1)); done; echo bye >&2;'
                 ' mkdir -p "$CASRUNS_ARTIFACTS_DIR/sub"; printf hello > "$CASRUNS_ARTIFACTS_DIR/sub/a.txt"; exit 2')
    wait(rid)
    html = httpx.get(f"{server.url}/runs/{rid}").text
    for text in ("failed", "exit code 2", f"casruns replay {rid}", "k=v", "line 2999 of a long log", "sub/a.txt",
                 f'href="/api/v1/runs/{rid}/artifacts/sub/a.txt"', f'href="/runs/{rid}/view/sub/a.txt"', "jump to end",
                 f'href="/runs/{rid}/log/stdout"', "<strong>created</strong>", "<strong>started</strong>", "<strong>failed</strong>"):
        assert text in html, text
    assert "line 0 of a long log" not in html  # only the last 64 KiB
    assert re.search(r"showing bytes \d+–\d+", html)
    assert "bye" in httpx.get(f"{server.url}/runs/{rid}?stream=stderr").text
    assert "stdout line 2999" in httpx.get(f"{server.url}/runs/{rid}?stream=transcript").text
    raw = httpx.get(f"{server.url}/runs/{rid}/log/stdout")
    assert raw.text.startswith("line 0 of a long log") and raw.headers["content-security-policy"].startswith("sandbox")
    view = httpx.get(f"{server.url}/runs/{rid}/view/sub/a.txt").text
    assert '<pre class="artifact" id="artifact-text">hello</pre>' in view
    assert httpx.get(f"{server.url}/runs/{rid}/view/nope.txt").status_code == 404
    assert httpx.get(f"{server.url}/runs/{rid}/view/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd").status_code in (400, 404)
    assert httpx.get(f"{server.url}/runs/NOSUCHRUN").status_code in (400, 404)
    assert httpx.get(f"{server.url}/runs/01ZZZZZZZZZZZZZZZZZZZZZZZZ/log/stdout").status_code == 404
    assert httpx.get(f"{server.url}/runs/{rid}?stream=bogus").status_code == 400


def test_run_page_of_an_active_run_is_wired_for_the_live_tail(server):
    rid = submit("--", "sh", "-c", "echo started; sleep 30")
    from conftest import poll_until

    poll_until(lambda: 'id="log">started' in httpx.get(f"{server.url}/runs/{rid}").text, what="output")
    html = httpx.get(f"{server.url}/runs/{rid}").text
    assert 'data-terminal="0"' in html and f'data-log="/api/v1/runs/{rid}/logs/stdout"' in html
    assert 'data-offset="8"' in html and f"&amp;run={rid}" in html
    assert "actions" not in html.lower().split("<h2>logs")[0].split("<h2>")[-1]  # no action forms without --allow-actions
    cli("cancel", rid, check=0)


# -- hostile input -------------------------------------------------------------------------------


def test_xss_corpus_renders_as_text_in_every_field(hostile, tmp_path):
    rid = hostile
    with Server() as s:
        runs = httpx.get(s.url + "/").text
        assert_inert(runs)
        assert escaped(XSS[0]) in runs and "{{7*7}}" in runs
        page = httpx.get(f"{s.url}/runs/{rid}").text
        assert_inert(page)
        for p in XSS:
            assert escaped(p) in page, p  # labels and stdout
        for n in XSS_NAMES:
            assert escaped(n) in page, n
        assert 'href="javascript' not in page and '<span class="mono">javascript:alert(1)</span> <small>(not an http(s) URL' in page  # preview url: text, not a link
        assert escaped(json.dumps({"k": XSS[3]})) in page and escaped(XSS[1]) in page  # runtime and promotion reason
        for stream in ("stderr", "transcript"):
            other = httpx.get(f"{s.url}/runs/{rid}?stream={stream}").text
            assert_inert(other)
            assert escaped("err " + XSS[0]) in other
        for n in XSS_NAMES:
            view = httpx.get(f"{s.url}/runs/{rid}/view/{quote(n, safe='')}")
            assert view.status_code == 200, n
            assert_inert(view.text)
            assert all(escaped(p) in view.text for p in XSS) and escaped(n) in view.text
        html_view = httpx.get(f"{s.url}/runs/{rid}/view/page.html").text
        assert_inert(html_view)
        assert escaped("<script>alert(document.cookie)</script>") in html_view
        binary = httpx.get(f"{s.url}/runs/{rid}/view/blob.bin").text
        assert "Not shown inline: not UTF-8 text" in binary and 'id="artifact-text"' not in binary
        raw = httpx.get(f"{s.url}/runs/{rid}/log/stdout")
        assert raw.headers["content-type"].startswith("text/plain") and "sandbox" in raw.headers["content-security-policy"]


def test_a_preview_url_is_a_link_only_for_http_and_https(tmp_path, casruns_home, monkeypatch):
    cli("init", check=0)
    monkeypatch.setenv("PYTHONPATH", str(write_plugin(tmp_path / "plug")))
    monkeypatch.setenv("CASRUNS_PLUGINS", "hostileplug")
    rids = {}
    for url in ("https://preview.example.test/a?b=1&c=\"><script>alert(1)</script>", "data:text/html,<script>alert(1)</script>",
                "JavaScript:alert(1)", "//evil.example/x"):
        boot = {"preview": {"url": url, "expires_at": "2030-01-01T00:00:00Z"}}
        rids[url] = submit("--provider", "hostile", "--env", "HOSTILE_BOOT=" + json.dumps(boot), "--", "true")
    wait(*rids.values())
    with Server() as s:
        for url, rid in rids.items():
            html = httpx.get(f"{s.url}/runs/{rid}").text
            assert_inert(html)
            assert "2030-01-01T00:00:00Z" in html
            links = re.findall(r'<dd id="preview"><a href="([^"]*)"', html)
            if url.startswith("https:"):
                assert links == [escaped(url)]
            else:
                assert links == [] and "not an http(s) URL" in html


# -- login, cookie, CSRF, actions ------------------------------------------------------------------


@pytest.fixture
def finished(casruns_home):
    cli("init", check=0)
    rid = submit("--", "true")
    wait(rid)
    return rid


def login(client: httpx.Client, token: str = TOKEN, nxt: str = "/") -> httpx.Response:
    return client.post("/login", data={"token": token, "next": nxt})


def test_login_sets_a_strict_httponly_cookie_and_the_token_is_never_echoed(finished, tmp_path):
    tokens = write_tokens(tmp_path / "tokens")
    with Server("--token-file", str(tokens)) as s, httpx.Client(base_url=s.url) as c:
        anon = c.get(f"/runs/{finished}")
        assert anon.status_code == 401 and 'action="/login"' in anon.text and f'value="/runs/{finished}"' in anon.text
        assert c.get("/static/app.js").status_code == 200 and c.get("/login").status_code == 200
        wrong = login(c, "x" * 20)
        assert wrong.status_code == 401 and "not valid" in wrong.text and "x" * 20 not in wrong.text
        ok = login(c, nxt=f"/runs/{finished}?stream=stderr")
        assert ok.status_code == 303 and ok.headers["location"] == f"/runs/{finished}?stream=stderr"
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith("casruns_session=") and TOKEN not in cookie
        flags = {f.strip().lower() for f in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= flags and "secure" not in flags
        page = c.get(f"/runs/{finished}")
        assert page.status_code == 200 and f"signed in as {LABEL}" in page.text and TOKEN not in page.text
        for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
            with httpx.Client(base_url=s.url) as c2:
                assert login(c2, nxt=evil).headers["location"] == "/"
        out = c.post("/logout")
        assert out.status_code == 303 and 'casruns_session=""' in out.headers["set-cookie"] or "max-age=0" in out.headers["set-cookie"].lower()
        c.cookies.clear()
        assert c.get("/").status_code == 401
        stderr = s.close()
    assert TOKEN not in stderr


def test_actions_need_allow_actions_a_login_and_the_csrf_token(finished, tmp_path):
    tokens = write_tokens(tmp_path / "tokens")
    with Server("--token-file", str(tokens)) as s, httpx.Client(base_url=s.url) as c:  # no --allow-actions
        login(c)
        page = c.get(f"/runs/{finished}").text
        assert 'action="/runs/' not in page
        csrf = re.search(r'name="csrf" value="([^"]*)"', page)
        assert csrf is None
        r = c.post(f"/runs/{finished}/promote", data={"reason": "x", "csrf": "whatever"})
        assert r.status_code == 403 and "allow-actions" in r.text
    with Server("--token-file", str(tokens), "--allow-actions") as s:
        with httpx.Client(base_url=s.url) as anon:
            assert anon.post(f"/runs/{finished}/promote", data={"reason": "x"}).status_code == 401
            bearer = anon.post(f"/runs/{finished}/promote", data={"reason": "x"}, headers={"authorization": f"Bearer {TOKEN}"})
            assert bearer.status_code == 403  # a form post needs the CSRF token of a session, whatever authenticates it
        with httpx.Client(base_url=s.url) as c:
            login(c)
            page = c.get(f"/runs/{finished}").text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            assert c.post(f"/runs/{finished}/promote", data={"reason": "x"}).status_code == 403
            assert c.post(f"/runs/{finished}/promote", data={"reason": "x", "csrf": "0" * 64}).status_code == 403
            assert c.get(f"/runs/{finished}/promote").status_code in (404, 405)
            assert c.post(f"/runs/{finished}/promote", data={"reason": "", "csrf": csrf}).status_code == 400
            assert cli_json("status", finished)[1][0]["retention"]["promoted"] is False
            done = c.post(f"/runs/{finished}/promote", data={"reason": "looks right", "csrf": csrf})
            assert done.status_code == 303 and done.headers["location"] == f"/runs/{finished}"
            rec = cli_json("status", finished)[1][0]
            assert rec["retention"]["promoted"] is True and rec["retention"]["promoted_by"] == LABEL
            assert rec["retention"]["promotion_reason"] == "looks right"
            assert c.post(f"/runs/{finished}/retain", data={"for": "30d", "csrf": csrf}).status_code == 303
            assert cli_json("status", finished)[1][0]["retention"]["retain_for"] is not None
            assert c.post(f"/runs/{finished}/unpromote", data={"reason": "changed my mind", "csrf": csrf}).status_code == 303
            history = cli_json("status", finished)[1][0]["retention"]["history"]
            assert [(h["action"], h.get("by")) for h in history] == [("promote", LABEL), ("unpromote", LABEL)]
            assert c.post(f"/runs/{finished}/explode", data={"csrf": csrf}).status_code == 400
        with httpx.Client(base_url=s.url) as other:  # another session's CSRF token does not fit this one
            login(other)
            assert other.post(f"/runs/{finished}/promote", data={"reason": "x", "csrf": csrf}).status_code == 403


def test_cancel_through_the_page(casruns_home, tmp_path):
    cli("init", check=0)
    rid = submit("--", "sleep", "30")
    tokens = write_tokens(tmp_path / "tokens")
    with Server("--token-file", str(tokens), "--allow-actions") as s, httpx.Client(base_url=s.url) as c:
        login(c)
        page = c.get(f"/runs/{rid}").text
        assert f'action="/runs/{rid}/cancel"' in page
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        assert c.post(f"/runs/{rid}/cancel", data={"csrf": csrf}).status_code == 303
        wait(rid)
        rec = cli_json("status", rid)[1][0]
        assert rec["status"] == "cancelled" and rec["cancel"]["reason"] == f"cancelled by {LABEL}"


def test_pages_answer_errors_as_html(server):
    r = httpx.get(server.url + "/runs/01ZZZZZZZZZZZZZZZZZZZZZZZZ")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html") and "run_not_found" in r.text


def test_the_runs_page_index_follows_every_change_and_reads_your_writes(casruns_home, tmp_path):
    """The runs page counts and filters from the server's in-memory index (web/index.py), kept
    current by the event hub: a change a command made before the page was asked is on it."""
    from casruns import Registry

    reg = Registry(str(casruns_home))
    early = reg.submit(["true"], spawn=False, labels={"side": "early"})["run_id"]
    with Server() as srv:
        def ids(**params):
            return re.findall(r'<tr data-run="([^"]+)"', httpx.get(srv.url + "/", params=params).text)

        assert ids() == [early]
        late = reg.submit(["true"], spawn=False, labels={"side": "late"})["run_id"]
        assert ids() == [late, early] and ids(label="side=late") == [late]
        reg.cancel(early)
        assert ids(status="cancelled") == [early]
        html = httpx.get(srv.url + "/").text
        assert re.search(r'data-count="cancelled">1<', html) and re.search(r'data-count="queued">1<', html)
        (casruns_home / "config.toml").write_text('[retention]\ncancelled = "0s"\n')
        cli("gc", check=0)
        assert ids() == [late]
