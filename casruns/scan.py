"""Audit stored runs against the current detectors: ``casruns scan``.

A registry written before a detector existed (or with a detector switched off) may hold
credentials. Scanning re-reads each run's manifest fields, logs, artifact names and text
artifacts through today's redactor and reports where something would now be masked. Text
that is already a mask (``user:[REDACTED:url_credentials]@host``, the masked body of a
private key) is not a finding. It changes nothing.
Declared secret values are not known any more (only their names were stored), so a scan
uses the detectors and the config's patterns.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING

from . import evidence, query
from .redaction import BINARY_SNIFF, looks_binary

if TYPE_CHECKING:
    from .redaction import Redactor
    from .root import RegistryRoot

SCHEMA = "casruns/scan/v1"


def _count(redactor: "Redactor", chunks) -> dict[str, int]:
    stream = redactor.stream()
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    return stream.hits


def _count_transcript(redactor: "Redactor", chunks) -> dict[str, int]:
    """Like :func:`_count` over the transcript's text, each stream apart, without the
    ``<timestamp> <stream> `` prefixes: the line of a masked key body is then the mask alone,
    as in the stream's own log (spec/format.md, "Transcript line format")."""
    streams: dict[bytes, object] = {}
    rest = b""
    for chunk in itertools.chain(chunks, [b"\n"]):  # streamed: one chunk and one line held
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            parts = line.split(b" ", 2)
            if len(parts) < 3:
                continue
            if parts[1] not in streams:
                streams[parts[1]] = redactor.stream()
            streams[parts[1]].feed(parts[2] + b"\n")
    out: dict[str, int] = {}
    for s in streams.values():
        s.close()
        for k, v in s.hits.items():
            out[k] = out.get(k, 0) + v
    return out


def scan_run(registry: "RegistryRoot", run_id: str, redactor: "Redactor") -> list[dict]:
    findings = []
    m = query.manifest(registry, run_id)

    def add(where: str, hits: dict[str, int]) -> None:
        for detector, count in sorted(hits.items()):
            findings.append({"run_id": run_id, "where": where, "detector": detector, "count": count})

    fields = {
        "argv": (m.get("request") or {}).get("argv"),
        "labels": m.get("labels"),
        "runtime": m.get("runtime"),
        "preview": m.get("preview"),
        "error": m.get("error"),
        "cancel": m.get("cancel"),
    }
    for name, value in fields.items():
        if value:
            text = json.dumps(value, ensure_ascii=False, sort_keys=True).encode()
            add(f"manifest:{name}", _count(redactor, [text]))
            masked = redactor.metadata(value)
            if masked != value and not _count(redactor, [text]):
                add(f"manifest:{name}", {"secret_key": 1})
    for stream, ref in (m.get("logs") or {}).items():
        if ref:
            chunks = registry.store.iter_chunks(ref["blake3"])
            add(f"logs:{stream}", _count_transcript(redactor, chunks) if stream == "transcript" else _count(redactor, chunks))
    tree = evidence.tree(registry, run_id)
    for entry in tree.entries:
        # the path is printed in the report: never print what a detector would mask in it
        where = redactor.text(entry.path)
        names = [entry.path] + ([entry.target] if entry.target is not None else [])
        add(f"artifact_name:{where}", _count(redactor, ["\n".join(names).encode()]))
        if entry.type != "file" or entry.blake3 is None:
            continue
        head = next(iter(registry.store.iter_chunks(entry.blake3)), b"") if entry.size else b""
        if looks_binary(head[:BINARY_SNIFF]):
            continue  # binary artifacts: detectors read text
        add(f"artifact:{where}", _count(redactor, registry.store.iter_chunks(entry.blake3)))
    for skipped in tree.skipped:
        add(f"artifact_name:{redactor.text(skipped['path'])}", _count(redactor, [str(skipped["path"]).encode()]))
    return findings


def scan(registry: "RegistryRoot", run_ids: list[str] | None = None, progress=None) -> dict:
    from .runs import iter_run_ids, run_stray

    redactor = registry.redactor()
    # strays in runs/ are skipped (verify reports them), as every reader does
    ids = list(run_ids) if run_ids else sorted(r for r in iter_run_ids(registry.runs_dir) if run_stray(registry.runs_dir, r) is None)
    findings: list[dict] = []
    for i, rid in enumerate(ids):
        findings.extend(scan_run(registry, rid, redactor))
        if progress:
            progress(i + 1, len(ids))
    return {"schema": SCHEMA, "runs_scanned": len(ids), "findings": findings}
