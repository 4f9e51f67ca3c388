"""Bad input from archives, hand edits and plugins is refused per run, never for the whole
registry (issue 14, item 5), and an archive cannot plant a credential (item 15)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from casruns import Registry
from casruns import manifest as mf
from conftest import cli, cli_json, damage_manifest
from test_gc import finished_run

GH = "ghp_" + "Z9" * 18


def archived(tmp_path, n=2):
    src = Registry(tmp_path / "A")
    rids = [finished_run(src, labels={"n": str(i)}) for i in range(n)]
    dest = tmp_path / "arch"
    src.archive_push(str(dest), rids)
    return dest, rids


def rewrite_archived_manifest(dest: Path, rid: str, mutate) -> None:
    path = next(p for p in dest.rglob("*") if p.is_file() and rid in p.name and "manifest" in str(p).lower() or (p.is_file() and p.name == f"{rid}.toml"))
    m = mf.loads(path.read_bytes())
    mutate(m)
    path.write_bytes(mf.dumps(m))


def _archived_manifest_path(dest: Path, rid: str) -> Path:
    for p in dest.rglob("*"):
        if p.is_file() and rid in str(p.relative_to(dest)):
            return p
    raise AssertionError(f"no archived manifest for {rid} under {dest}")


@pytest.mark.parametrize(
    "field, value",
    [("labels", "x"), ("error", "x"), ("created_at", 12345), ("logs", ["x"])],
)
def test_a_pull_skips_an_invalid_manifest_and_keeps_every_other_run(tmp_path, monkeypatch, field, value, validate):
    dest, (good, bad) = archived(tmp_path)
    path = _archived_manifest_path(dest, bad)
    text = path.read_bytes().split(b"\n", 1)[1]  # drop the checksum line: a hand edit
    m = __import__("tomllib").loads(text.decode())
    m[field] = value
    import tomli_w

    path.write_bytes(tomli_w.dumps(m).encode())
    monkeypatch.setenv("CASRUNS_HOME", str(tmp_path / "B"))
    proc, out = cli_json("archive", "list", str(dest))
    assert proc.returncode == 6 and [r["run_id"] for r in out[0]["runs"]] == [good]
    assert out[0]["errors"][0]["run_id"] == bad
    validate(out[0], "reports.schema.json#/$defs/archive_list")
    proc, out = cli_json("archive", "pull", str(dest))
    assert proc.returncode == 6, proc.stdout + proc.stderr
    report = validate(out[0], "reports.schema.json#/$defs/archive_pull")
    assert report["pulled"] == [good] and [e["run_id"] for e in report["errors"]] == [bad]
    assert report["errors"][0]["code"] == "manifest_corrupt"
    proc, out = cli_json("list")
    assert proc.returncode == 0 and [r["run_id"] for r in out[0]["runs"]] == [good]
    assert not (tmp_path / "B" / "runs" / bad).exists()
    assert json.loads(cli("verify", "--json").stdout)["ok"] is True


def test_a_local_manifest_with_a_toml_datetime_hides_only_its_run(registry):
    import datetime

    good = finished_run(registry)
    bad = finished_run(registry)
    damage_manifest(registry.run_dir(bad), lambda m: m.update(created_at=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)))
    for env in ({}, {"CASRUNS_NO_FASTPATH": "1"}):
        proc, out = cli_json("list", env=env)
        assert proc.returncode == 6 and [r["run_id"] for r in out[0]["runs"]] == [good], (env, proc.stdout)
        assert out[0]["errors"][0]["run_id"] == bad and out[0]["errors"][0]["code"] == "manifest_corrupt"
        proc, out = cli_json("status", bad, env=env)
        assert proc.returncode == 6 and out[0]["error"]["code"] == "manifest_corrupt"
        assert "created_at" in out[0]["error"]["message"]
    proc, out = cli_json("list", "--label", "a=b")
    assert proc.returncode == 6 and out[0]["runs"] == []


def test_a_pulled_manifest_passes_todays_detectors(tmp_path, monkeypatch):
    dest, (rid, _) = archived(tmp_path)
    path = _archived_manifest_path(dest, rid)
    m = mf.loads(path.read_bytes())
    m["labels"]["ci"] = f"token {GH}"
    m["runtime"] = {"note": f"Authorization: Bearer {GH}"}
    m["request"]["argv"] = ["curl", "-H", f"Authorization: token {GH}"]
    path.write_bytes(mf.dumps(m))
    monkeypatch.setenv("CASRUNS_HOME", str(tmp_path / "B"))
    cli("archive", "pull", str(dest), rid, check=0)
    stored = (tmp_path / "B" / "runs" / rid / "manifest.toml").read_text()
    assert GH not in stored
    rec = json.loads(cli("status", rid, "--json").stdout)
    assert GH not in json.dumps(rec)
    assert Registry(tmp_path / "B").manifest(rid)["request"]["argv_redacted"] is True


PLUGIN = """
import datetime, math
from casruns.plugins import hookimpl

@hookimpl
def casruns_boot(run):
    return {"runtime": {"when": datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                        "load": float("nan"), "huge": float("inf"), "ids": (1, 2), "obj": object.__new__(object)}}
"""


@pytest.mark.slow
def test_plugin_metadata_is_normalised_before_it_is_committed(casruns_home, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "oddmeta.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(site))
    rid = json.loads(cli("--plugin", "oddmeta", "submit", "--json", "--", "true", check=0).stdout)["run_id"]
    cli("wait", rid, check=0)
    for env in ({}, {"CASRUNS_NO_FASTPATH": "1"}):
        out = cli("status", rid, "--json", env=env, check=0).stdout

        def strict(c):
            raise ValueError(f"not JSON: {c}")

        rec = json.loads(out, parse_constant=strict)
        rt = rec["runtime"]
        assert rt["when"] == "2030-01-02T03:04:05+00:00" and rt["load"] == "nan" and rt["huge"] == "inf"
        assert rt["ids"] == [1, 2] and isinstance(rt["obj"], str)
    assert cli("list", "--json").returncode == 0
