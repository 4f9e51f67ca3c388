"""Shared fixtures: every test gets its own registry root through CASRUNS_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"


@pytest.fixture(autouse=True)
def casruns_home(tmp_path, monkeypatch):
    home = tmp_path / "registry"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    monkeypatch.delenv("CASRUNS_NO_FASTPATH", raising=False)
    return home


@pytest.fixture
def registry(casruns_home):
    from casruns import Registry

    reg = Registry(casruns_home)
    reg.init()
    return reg


def poll_until(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def casruns_exe() -> list[str]:
    exe = Path(sys.executable).with_name("casruns")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "casruns"]


def cli(*args, env=None, input=None, check=None, timeout=60):
    """Run the real casruns executable; returns CompletedProcess with text output."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        casruns_exe() + [str(a) for a in args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=timeout,
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}, stderr: {proc.stderr}\nstdout: {proc.stdout}"
    return proc


def cli_json(*args, **kw):
    # --json goes right after the subcommand, before any `--` that starts a command line
    n = 2 if args[0] == "archive" else 1  # after the (sub)command's name
    proc = cli(*args[:n], "--json", *args[n:], **kw)
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
    return proc, lines


def load_schema(name: str) -> dict:
    return json.loads((SPEC / name).read_text())


@pytest.fixture
def validate():
    """validate(instance, "run.schema.json") checks an output against a spec/ schema."""
    import jsonschema
    from referencing import Registry as RefRegistry, Resource

    resources = []
    for p in SPEC.glob("*.schema.json"):
        doc = json.loads(p.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    refs = RefRegistry().with_resources(resources)

    def check(instance, schema_name):
        name, _, fragment = schema_name.partition("#")
        schema = load_schema(name)
        if fragment:
            schema = {"$schema": schema["$schema"], "$ref": schema["$id"] + "#" + fragment}
        cls = jsonschema.validators.validator_for(schema)
        cls(schema, registry=refs, format_checker=cls.FORMAT_CHECKER).validate(instance)
        return instance

    return check


def damage_manifest(run, mutate) -> None:
    """Rewrite a run's manifest with ``mutate`` applied, bypassing the writers' own checks (they
    refuse a manifest readers could not use): how a crafted or damaged manifest gets on disk."""
    from casruns import fsutil
    from casruns import manifest as mf

    m = run.read_fresh()
    mutate(m)
    fsutil.atomic_write(run.manifest_path, mf.dumps(m))
    try:
        os.unlink(os.path.join(run.path, "manifest.json"))
    except FileNotFoundError:
        pass


from contextlib import contextmanager


@contextmanager
def mounted_tmpfs(path: Path, mib: int):
    """A fresh tmpfs of ``mib`` MiB at ``path`` (a real disk that fills up), unmounted lazily at
    the end (a Registry of the test may still hold a lock open there). Skips, saying why, when
    not root or when mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(path: Path) -> Path:
    """Take every free byte of the filesystem holding ``path`` (a new file there), as another
    program would: big writes first, then smaller ones down to single bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


@contextmanager
def read_only_view(src: Path, dst: Path):
    """``src`` bind-mounted read-only at ``dst`` (a snapshot, an archived disk). Skips, saying
    why, when not root or when bind mounts are not allowed."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (CI runs as root)")
    dst.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], check=True, capture_output=True)
        yield dst
    finally:
        subprocess.run(["umount", "-l", str(dst)], capture_output=True)
