"""The pages in a real browser: Playwright (Python) driving Debian's Chromium against ``casruns serve``.

Skips, saying why, without /usr/bin/chromium or the playwright package (Playwright's own browser
download is not used). Screenshots of the pages go to ``test-artifacts/screenshots/`` (or
``$CASRUNS_TEST_ARTIFACTS/screenshots``) for a person to look at; they are not committed.
The live parts read the JSON API (``/api/v1/events``, ``/api/v1/runs/{id}/logs/...``,
``/api/v1/runs/{id}/artifacts/...``); those scenarios skip, saying so, on a server without it.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
httpx = pytest.importorskip("httpx")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    pytest.skip("browser tests need the playwright package (pip install playwright)", allow_module_level=True)

from conftest import ROOT, cli, cli_json, poll_until  # noqa: E402
from webserve import LABEL, TOKEN, XSS, Server, write_tokens  # noqa: E402

SHOTS = Path(os.environ.get("CASRUNS_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "screenshots"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        except Exception as e:  # a chromium that cannot start here: say why
            pytest.skip(f"chromium at {CHROMIUM} does not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    yield pg
    context.close()


def shot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def submit(*args) -> str:
    proc, lines = cli_json("submit", *args)
    assert proc.returncode == 0, proc.stderr
    return lines[0]["run_id"]


def wait(*rids) -> None:
    assert cli("wait", *rids, "--timeout", "60").returncode != 13


def need_api(server) -> None:
    if httpx.get(server.url + "/api/v1/runs").status_code == 404:
        pytest.skip("the live parts read the JSON API (/api/v1/runs, /events, /logs, /artifacts): this server has none yet")


@pytest.fixture
def server(casruns_home):
    cli("init", check=0)
    with Server() as s:
        yield s


def test_a_run_submitted_from_the_cli_appears_and_changes_state_live(server, page):
    need_api(server)
    old = submit("--label", "kind=old", "--", "true")
    wait(old)
    page.goto(server.url + "/")
    page.evaluate("window.__not_reloaded = true")
    expect(page.locator("body")).to_have_attribute("data-live", "open", timeout=10_000)
    rid = submit("--label", "kind=new", "--", "sh", "-c", "sleep 1.5; echo done")
    row = page.locator(f'tr[data-run="{rid}"]')
    expect(row).to_be_visible(timeout=15_000)
    expect(row.locator("td.status")).to_have_text(re.compile("queued|booting|running"), timeout=5_000)
    expect(row.locator("td.status")).to_have_text("succeeded", timeout=30_000)
    expect(page.locator('[data-count="succeeded"]')).to_have_text("2")
    assert page.evaluate("window.__not_reloaded") is True  # updated in place, no reload
    assert page.locator("tbody tr").first.get_attribute("data-run") == rid
    shot(page, "runs-page")
    page.set_viewport_size(PHONE)
    shot(page, "runs-page-phone")


def test_the_run_page_tails_a_log_live(server, page):
    need_api(server)
    rid = submit("--", "sh", "-c", "echo first line; sleep 2; echo second line; sleep 1; echo third line")
    poll_until(lambda: "first line" in cli("logs", rid).stdout, what="first output")
    page.goto(f"{server.url}/runs/{rid}")
    page.evaluate("window.__not_reloaded = true")
    log = page.locator("#log")
    expect(log).to_contain_text("first line")
    expect(log).to_contain_text("third line", timeout=30_000)
    assert log.inner_text().count("first line") == 1  # resumed at the offset shown: no byte twice
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=30_000)
    assert page.evaluate("window.__not_reloaded") is True
    page.reload()
    shot(page, "run-page")
    page.set_viewport_size(PHONE)
    shot(page, "run-page-phone")


def test_an_artifact_downloads_byte_for_byte(server, page, tmp_path):
    need_api(server)
    data = secrets.token_bytes(300_000) + bytes(range(256))
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    rid = submit("--", "sh", "-c", f'cp {src} "$CASRUNS_ARTIFACTS_DIR/out.bin"')
    wait(rid)
    page.goto(f"{server.url}/runs/{rid}")
    with page.expect_download() as info:
        page.locator("#artifacts a", has_text="download").first.click()
    dest = tmp_path / "got.bin"
    info.value.save_as(dest)
    assert dest.read_bytes() == data


def test_a_text_artifact_with_an_xss_payload_renders_inert(server, page, tmp_path):
    body = "\n".join(XSS + ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>"]) + "\n"
    src = tmp_path / "evil.html"
    src.write_text(body)
    rid = submit("--label", "x=<img src=x onerror=window.__pwned=1>", "--", "sh", "-c",
                 f'cat {src}; cp {src} "$CASRUNS_ARTIFACTS_DIR/<svg onload=window.__pwned=1>.html"')
    wait(rid)
    page.goto(f"{server.url}/runs/{rid}")
    expect(page.locator("#log")).to_contain_text("<script>alert(1)</script>")
    page.locator("#artifacts a", has_text="view").first.click()
    expect(page.locator("#artifact-text")).to_be_visible()
    assert page.locator("#artifact-text").inner_text() == body
    page.goto(server.url + "/")
    page.wait_for_timeout(300)
    assert page.dialogs == [] and page.evaluate("window.__pwned") is None


@pytest.fixture
def guarded(casruns_home, tmp_path):
    """A finished run, and a server with a token file and --allow-actions."""
    cli("init", check=0)
    rid = submit("--", "true")
    wait(rid)
    with Server("--token-file", str(write_tokens(tmp_path / "tokens")), "--allow-actions") as s:
        yield s, rid


def test_promote_through_the_page_with_a_token(guarded, page):
    s, rid = guarded
    page.goto(f"{s.url}/runs/{rid}")
    page.fill('input[name="token"]', TOKEN)
    page.click('form.login button[type="submit"]')
    expect(page).to_have_url(f"{s.url}/runs/{rid}")
    cookie = [c for c in page.context.cookies() if c["name"] == "casruns_session"][0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: not readable by script
    page.fill('#promote-form input[name="reason"]', "reviewed in the browser")
    page.click('#promote-form button[type="submit"]')
    expect(page.locator("#promoted")).to_contain_text(f"yes, by {LABEL}")
    shot(page, "run-page-promoted")
    stderr = s.close()
    rec = cli_json("status", rid)[1][0]
    assert rec["retention"]["promoted"] is True and rec["retention"]["promoted_by"] == LABEL
    assert rec["retention"]["promotion_reason"] == "reviewed in the browser"
    assert TOKEN not in stderr


def test_a_request_without_the_token_fails(guarded, browser):
    s, rid = guarded
    context = browser.new_context()
    pg = context.new_page()
    resp = pg.goto(f"{s.url}/runs/{rid}")
    assert resp.status == 401 and pg.locator('input[name="token"]').is_visible()
    assert rid not in pg.locator("main").inner_text()
    post = context.request.post(f"{s.url}/runs/{rid}/promote", form={"reason": "no token"})
    assert post.status == 401
    api = context.request.get(f"{s.url}/api/v1/runs/{rid}")
    assert api.status == 401
    context.close()
    assert cli_json("status", rid)[1][0]["retention"]["promoted"] is False
