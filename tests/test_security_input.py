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


# -- size caps, enforced while decompressing (issue 14, item 3) ----------------------------


def huge_tree_blob(store, mib: int) -> str:
    """A valid tree document padded to ``mib`` MiB: its zstd frame is a few KiB."""
    doc = b'{"schema":"casruns/tree/v1","entries":[],"pad":"' + b"a" * (mib << 20) + b'"}'
    return store.put_bytes(doc).address


def test_reading_a_blob_with_a_limit_stops_while_decompressing(registry):
    from casruns.errors import TooLarge

    address = huge_tree_blob(registry.store, 40)
    consumed = 0
    real = registry.store.iter_chunks

    def counting(a):
        nonlocal consumed
        for chunk in real(a):
            consumed += len(chunk)
            yield chunk

    registry.store.iter_chunks = counting
    with pytest.raises(TooLarge):
        registry.store.read_bytes(address, limit=1 << 20)
    assert consumed <= (1 << 20) + (4 << 20), consumed  # the limit plus at most one chunk


def test_an_oversized_tree_is_reported_by_every_reader_and_stops_no_command(registry, tmp_path, monkeypatch, validate):
    good = finished_run(registry, files={"a.txt": b"a"})
    bad = finished_run(registry, files={"b.txt": b"b"})
    address = huge_tree_blob(registry.store, 40)
    damage_manifest(registry.run_dir(bad), lambda m: m["artifacts"].update(tree=address))
    proc, out = cli_json("artifacts", bad)
    assert proc.returncode == 6 and out[0]["error"]["code"] == "too_large", proc.stdout
    proc, out = cli_json("verify")
    assert proc.returncode == 14
    kinds = {(p["kind"], p["run_id"]) for p in validate(out[0], "reports.schema.json#/$defs/verify")["problems"]}
    assert ("tree_invalid", bad) in kinds
    proc, out = cli_json("gc")
    report = validate(out[0], "reports.schema.json#/$defs/gc")
    assert proc.returncode == 14 and report["swept"] is False
    assert [(t["run_id"], t["code"]) for t in report["trees_unreadable"]] == [(bad, "too_large")]
    assert cli("cat", good, "a.txt", check=0).stdout == "a"
    # push refuses to archive it (it cannot know what the tree references) ...
    dest = tmp_path / "arch"
    proc, out = cli_json("archive", "push", str(dest), bad)
    assert proc.returncode == 6 and out[0]["error"]["code"] == "too_large"
    # ... and an archive that holds one anyway (written by hand): pull refuses that run only
    registry.archive_push(str(dest), [good])
    from casruns.archive import blob_key, manifest_key

    (dest / blob_key(address)).parent.mkdir(parents=True, exist_ok=True)
    (dest / blob_key(address)).write_bytes(Path(registry.store.path_for(address)).read_bytes())
    (dest / manifest_key(bad)).parent.mkdir(parents=True, exist_ok=True)
    (dest / manifest_key(bad)).write_bytes(Path(registry.run_dir(bad).manifest_path).read_bytes())
    monkeypatch.setenv("CASRUNS_HOME", str(tmp_path / "B"))
    proc, out = cli_json("archive", "pull", str(dest))
    assert proc.returncode == 6, proc.stdout + proc.stderr
    assert out[0]["pulled"] == [good] and out[0]["errors"][0]["code"] == "too_large"
    assert not (tmp_path / "B" / "runs" / bad).exists()


def test_a_tree_nested_absurdly_deep_is_a_clear_error(registry):
    from casruns.errors import CorruptManifest
    from casruns.tree import Tree

    with pytest.raises(CorruptManifest, match="nested too deeply"):
        Tree.from_bytes(b"[" * 200_000 + b"]" * 200_000)


@pytest.mark.parametrize("marker", ["dev-zero", "not-utf8", "not-toml"])
def test_a_bad_archive_marker_is_a_clear_error(tmp_path, marker):
    dest, _ = archived(tmp_path, n=1)
    from casruns.archive import MARKER

    m = dest / MARKER
    m.unlink()
    if marker == "dev-zero":
        m.symlink_to("/dev/zero")
    else:
        m.write_bytes(b"\xff\xfe format" if marker == "not-utf8" else b"format = [unclosed")
    for args in (["archive", "list", str(dest)], ["archive", "pull", str(dest)]):
        proc, out = cli_json(*args, timeout=30)
        assert proc.returncode == 6, (args, proc.stdout, proc.stderr)
        assert out[0]["error"]["code"] in ("stray_file", "unsupported_format", "too_large"), out


def test_a_sparse_giant_archived_manifest_is_refused_without_reading_it(tmp_path, monkeypatch):
    dest, (rid,) = archived(tmp_path, n=1)
    path = _archived_manifest_path(dest, rid)
    with open(path, "r+b") as f:
        f.truncate(3 << 30)  # 3 GiB, sparse: costs no disk, would cost 3 GiB of memory
    monkeypatch.setenv("CASRUNS_HOME", str(tmp_path / "B"))
    proc, out = cli_json("archive", "pull", str(dest), timeout=60)
    assert proc.returncode == 6 and out[0]["errors"][0]["code"] == "too_large", proc.stdout


def test_a_bad_regex_in_config_is_a_clear_error_naming_it(registry, casruns_home):
    (casruns_home / "config.toml").write_text('[redaction.patterns]\nmine = "(unclosed"\n')
    for args in (["submit", "--", "true"], ["list"], ["scan"]):
        proc, out = cli_json(*args)
        assert proc.returncode == 6, (args, proc.stdout)  # a bad config is a registry error, as every config error
        assert out[0]["error"]["code"] == "registry_error" and "redaction.patterns.mine" in out[0]["error"]["message"]
        assert "regular expression" in out[0]["error"]["message"]


@pytest.mark.parametrize("args", [["archive", "list", "s3://bucket/p"], ["archive", "pull", "s3://bucket/p"], ["archive", "push", "s3://bucket/p", "--promoted"]])
def test_an_unreachable_object_store_is_one_clear_line(registry, args):
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1",
           "CASRUNS_S3_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port here
    rid = finished_run(registry)
    registry.promote(rid, reason="to push")
    proc, out = cli_json(*args, env=env, timeout=120)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    assert out[0]["error"]["code"] == "archive_unavailable", out
    plain = cli(*args, env=env, timeout=120)
    assert plain.returncode == 6 and len(plain.stderr.strip().splitlines()) == 1 and "internal error" not in plain.stderr


@pytest.mark.parametrize("text", [
    '[redaction]\npatterns = "x"\n', '[redaction]\npatterns = ["a"]\n', '[redaction]\ndetectors = "x"\n',
    '[redaction.detectors]\ngithub_token = "no"\n', '[retention]\nkeep_last = 5\n', 'retention = "x"\n', 'archive = 3\n',
])
def test_a_config_table_of_the_wrong_type_is_a_clear_error(registry, casruns_home, text):
    (casruns_home / "config.toml").write_text(text)
    for args in (["submit", "--", "true"], ["list"], ["gc"]):
        proc, out = cli_json(*args)
        assert proc.returncode == 6 and out[0]["error"]["code"] == "registry_error", (args, text, proc.stdout)
        assert "internal error" not in out[0]["error"]["message"]


def test_a_timestamp_at_the_end_of_time_is_refused_not_a_crash(registry):
    rid = finished_run(registry)
    proc, out = cli_json("retain", rid, "--until", "9999-12-31T23:59:59.999999Z")
    assert proc.returncode == 3 and out[0]["error"]["code"] == "invalid_input", proc.stdout
    assert cli("status", rid).returncode == 0


@pytest.mark.parametrize("mutate", [
    lambda m: m["retention"].update(history="x"),
    lambda m: m["retention"].update(history=["x", 1]),
    lambda m: m["retention"].update(retain_for="x"),
    lambda m: m["request"].update(cwd=5),
    lambda m: m.update(cancel={"requested_at": __import__("datetime").datetime(2026, 1, 1)}),
    lambda m: m.update(finished_at="9999-12-31T23:59:59.999999Z"),
], ids=["history-str", "history-mixed", "retain_for-str", "cwd-int", "cancel-datetime", "finished-year-9999"])
def test_a_hand_edited_field_hides_only_its_run(registry, mutate):
    good = finished_run(registry)
    bad = finished_run(registry)
    damage_manifest(registry.run_dir(bad), mutate)
    for env in ({}, {"CASRUNS_NO_FASTPATH": "1"}):
        proc, out = cli_json("status", bad, env=env)
        assert proc.returncode == 6 and out[0]["error"]["code"] == "manifest_corrupt", (env, proc.stdout)
        proc, out = cli_json("list", env=env)
        assert proc.returncode == 6 and [r["run_id"] for r in out[0]["runs"]] == [good], proc.stdout
    for args in (["promote", bad, "--reason", "x"], ["replay", bad], ["export", bad, "/tmp/casruns-never"]):
        proc = cli(*args)
        assert proc.returncode == 6 and "internal error" not in proc.stderr, (args, proc.stderr)


def test_a_checksummed_cache_holding_garbage_is_ignored_not_a_crash(registry):
    from casruns import manifest as mf

    rid = finished_run(registry)
    run = registry.run_dir(rid)
    mf.read(run.manifest_path)  # the cache exists
    cache = Path(run.path) / "manifest.json"
    doc = json.loads(cache.read_bytes())
    for bad in ("[" * 100_000 + "]" * 100_000, '{"schema": "casruns/manifest/v1", "run_id": 5}'):
        body = json.dumps({k: v for k, v in doc.items() if k not in ("schema", "checksum")}, separators=(",", ":"))[1:-1]
        body = body.replace(json.dumps(doc["manifest"], separators=(",", ":")), bad)
        import hashlib

        covered = (body + "}").encode()  # the checksum covers every byte after '",'
        head = b'{"schema":"casruns/manifest-cache/v2","checksum":"blake2b-256:'
        data = head + hashlib.blake2b(covered, digest_size=32).hexdigest().encode() + b'",' + covered
        assert json.loads(data) if not bad.startswith("[") else True
        assert mf.parse_cache(data) is None
        st = cache.stat()
        cache.write_bytes(data)
        os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert cli("status", rid, "--json").returncode == 0
        assert cli("list", "--json").returncode == 0
