"""Ids, path safety, durable writes, manifests and the transition table."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from casruns import fsutil, manifest as mf
from casruns.errors import CorruptManifest, InvalidRunId, InvalidTransition, UnsafePath, UnsupportedFormat
from casruns.ids import new_run_id, safe_relpath, validate_run_id
from casruns.timefmt import parse_duration


class TestRunIds:
    def test_generated_ids_are_unique_sortable_and_valid(self):
        ids = [new_run_id(now=1_700_000_000 + i) for i in range(50)]
        assert ids == sorted(ids)
        assert len(set(new_run_id() for _ in range(10_000))) == 10_000
        for rid in ids:
            assert validate_run_id(rid) == rid
            assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", rid)

    @pytest.mark.parametrize(
        "bad",
        ["", "../x", "..", "a/b", "/abs", "a\x00b", "x" * 129, ".hidden", "a..b", "-flag", "a b", "ü", "a\\b", "run\n"],
    )
    def test_traversal_and_junk_are_rejected(self, bad):
        with pytest.raises(InvalidRunId):
            validate_run_id(bad)

    def test_non_string_rejected(self):
        with pytest.raises(InvalidRunId):
            validate_run_id(123)

    @pytest.mark.parametrize("good", ["my-run_1", "A", "build.2026-11-24", "x" * 128])
    def test_caller_ids_accepted(self, good):
        assert validate_run_id(good) == good


class TestSafeRelpath:
    @pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../b", "a\x00", "a\\b", ".", "./"])
    def test_rejects(self, bad):
        with pytest.raises(UnsafePath):
            safe_relpath(bad)

    def test_normalizes(self):
        assert safe_relpath("a//b/./c") == "a/b/c"


class TestDurations:
    @pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1h30m", 5400), ("2d", 172800), ("1.5s", 1.5), ("250ms", 0.25)])
    def test_parse(self, text, seconds):
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("bad", ["", "abc", "10x", "-5", "5m3", "m"])
    def test_reject(self, bad):
        from casruns.errors import InvalidInput

        with pytest.raises(InvalidInput):
            parse_duration(bad)


class TestAtomicWrite:
    def test_writes_private_file_regardless_of_umask(self, tmp_path):
        old = os.umask(0)
        try:
            fsutil.atomic_write(tmp_path / "f", b"data")
            fsutil.ensure_dir(tmp_path / "d" / "e")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "d" / "e").stat().st_mode) == 0o700
        assert (tmp_path / "f").read_bytes() == b"data"

    def test_failed_write_leaves_old_content_and_no_temp(self, tmp_path, monkeypatch):
        target = tmp_path / "f"
        fsutil.atomic_write(target, b"old")

        def boom(*a):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "rename", boom)
        from casruns.errors import RegistryError

        with pytest.raises(RegistryError, match="No space left"):
            fsutil.atomic_write(target, b"new")
        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["f"]

    def test_no_bare_write_opens_in_the_package(self):
        """Registry files are written through fsutil only (STYLE: one way to write durably)."""
        pkg = Path(__file__).resolve().parent.parent / "casruns"
        offenders = []
        pattern = re.compile(r"""(?<![\w.])open\([^)]*["'](w|a|x|wb|ab|xb|w\+|r\+)["']""")
        for path in pkg.rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "export target" not in line and "``" not in line:
                    offenders.append(f"{path.name}:{n}: {line.strip()}")
        assert offenders == []


def _manifest(**kw):
    m = {
        "schema": mf.SCHEMA,
        "run_id": "r1",
        "status": "queued",
        "created_at": "2026-11-24T22:00:00.000000Z",
        "updated_at": "2026-11-24T22:00:00.000000Z",
        "labels": {"suite": "unit"},
        "request": {"argv": ["true"]},
    }
    m.update(kw)
    return m


class TestManifest:
    def test_round_trip_preserves_unknown_fields(self, tmp_path):
        m = _manifest(future_field="kept", exit_code=None)
        m["request"]["future_nested"] = {"a": [1, 2]}
        m["future_table"] = {"x": 1}
        path = str(tmp_path / "manifest.toml")
        mf.write(path, m)
        back = mf.read_toml(path)
        assert back["future_field"] == "kept"
        assert back["request"]["future_nested"] == {"a": [1, 2]}
        assert back["future_table"] == {"x": 1}
        assert "exit_code" not in back  # None means absent
        back["status"] = "booting"
        mf.write(path, back)
        again = mf.read_toml(path)
        assert again["future_field"] == "kept" and again["future_table"] == {"x": 1}

    def test_cache_is_used_only_when_it_matches(self, tmp_path):
        path = str(tmp_path / "manifest.toml")
        mf.write(path, _manifest())
        assert mf.read(path) == mf.read_toml(path)
        # A stale cache (manifest rewritten behind its back) is ignored.
        data = mf.dumps(_manifest(status="cancelled"))
        fsutil.atomic_write(path, data)
        assert mf.read(path)["status"] == "cancelled"
        # A torn cache is ignored too.
        (tmp_path / "manifest.json").write_bytes(b'{"schema": "casruns/manifest-cache/v1", "tag": [')
        assert mf.read(path)["status"] == "cancelled"

    def test_newer_schema_is_refused_clearly(self, tmp_path):
        path = tmp_path / "manifest.toml"
        path.write_text('schema = "casruns/manifest/v2"\nrun_id = "r1"\nstatus = "queued"\n')
        with pytest.raises(UnsupportedFormat, match="newer"):
            mf.read_toml(str(path))

    def test_garbage_is_corrupt(self, tmp_path):
        path = tmp_path / "manifest.toml"
        path.write_text("schema = [unterminated")
        with pytest.raises(CorruptManifest):
            mf.read_toml(str(path))

    def test_transition_table(self):
        m = _manifest()
        for new in ("booting", "running", "collecting_artifacts", "succeeded"):
            mf.transition(m, new, "2026-11-24T22:00:01.000000Z")
        assert m["finished_at"] and m["started_at"]
        for new in mf.STATUSES:
            if new != "succeeded":
                with pytest.raises(InvalidTransition):
                    mf.transition(m, new, "t")

    @pytest.mark.parametrize("terminal", sorted(mf.TERMINAL))
    def test_terminal_statuses_never_change(self, terminal):
        assert mf.TRANSITIONS[terminal] == frozenset()

    def test_queued_cannot_jump_to_running(self):
        with pytest.raises(InvalidTransition):
            mf.transition(_manifest(), "running", "t")


def test_error_table_in_spec_matches_the_classes():
    import casruns.store  # noqa: F401  (defines PackCorrupt through casruns.packs: run alone, nothing else imports it)
    from casruns.errors import all_error_classes

    spec = (Path(__file__).resolve().parent.parent / "spec" / "cli.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_]+)` \| (\d+) \| `(\w+)` \|", spec, re.M))
    classes = {(c.code, str(c.exit_code), c.__name__) for c in all_error_classes()}
    assert rows == classes
