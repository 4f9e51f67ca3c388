"""Helpers of the web tests: a real ``casruns serve`` subprocess, token files, hostile input."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from conftest import casruns_exe

TOKEN = "s3cret-token-0123456789abcdef"
LABEL = "alice"

# classic payloads: each must come out of every page as text, never as markup
XSS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(1)>",
    "</pre><script>alert(1)</script>",
    "<svg><script>alert(1)</script></svg>",
    "javascript:alert(1)",
    "{{7*7}}",
    "<iframe src=javascript:alert(1)>",
]
# what may be a file name (no "/")
XSS_NAMES = ['"><img src=x onerror=alert(1)>', "<svg onload=alert(1)>", "{{7*7}}.txt", "<body onload=alert(1)>.html"]

PLUGIN = '''
from casruns.plugins import hookimpl
import json

@hookimpl
def casruns_providers():
    return ["hostile"]

@hookimpl
def casruns_boot(run):
    if run.provider != "hostile":
        return None
    spec = json.loads((run.env or {}).get("HOSTILE_BOOT") or "{}")
    return spec
'''


def write_plugin(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "hostileplug.py").write_text(PLUGIN)
    return where


def write_tokens(path: Path, lines: str = f"{LABEL}:{TOKEN}\n") -> Path:
    path.write_text(lines)
    os.chmod(path, 0o600)
    return path


class Server:
    """``casruns serve --port 0 ARGS`` until closed; ``url`` from the line it prints."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        full = dict(os.environ)
        full.update(env or {})
        self.proc = subprocess.Popen(casruns_exe() + ["serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=full)
        self.stderr_lines: list[str] = []
        deadline = time.monotonic() + 30
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            m = re.search(r"casruns serve: listening on (\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            self.close()
            raise AssertionError(f"casruns serve did not start: {''.join(self.stderr_lines)}")

    def close(self) -> str:
        """Stop it; returns everything it printed on stderr."""
        if self.proc.returncode is not None and self.proc.stderr.closed:
            return "".join(self.stderr_lines)
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.stderr_lines.append(err or "")
        return "".join(self.stderr_lines)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finished_run(registry, tmp_path, script: str, **kw) -> dict:
    """A run of ``sh -c SCRIPT`` in a fresh working directory, waited for; its record."""
    ws = tmp_path / f"ws-{time.monotonic_ns()}"
    ws.mkdir()
    r = registry.submit(["sh", "-c", script], cwd=str(ws), **kw)
    records, done = registry.wait([r["run_id"]], timeout=60)
    assert done
    return records[0]
