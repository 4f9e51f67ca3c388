"""The artifact tree object: one content-addressed listing of a run's artifact files.

A tree is canonical JSON (spec/format.md, "Tree objects") stored as a blob, so a run
references its whole artifact bundle by one address and identical bundles dedup.

Collection walks the artifact directory through directory file descriptors with
``O_NOFOLLOW``: a symlink is recorded as a link (its target text), never followed, so a
command cannot make casruns read a file outside its artifact directory, even by swapping
a directory for a symlink while collection runs.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import fsutil
from .errors import CorruptManifest, InvalidAddress, StrayFile, UnsafePath
from .ids import safe_relpath, validate_address

if TYPE_CHECKING:
    from .redaction import Redactor
    from .batch import Batch
    from .store import BlobStore

TREE_SCHEMA = "casruns/tree/v1"
SMALL = 1 << 20


@dataclass(frozen=True)
class TreeEntry:
    path: str
    type: str  # "file" or "symlink"
    mode: int = 0o644
    size: int = 0
    blake3: str | None = None  # files
    target: str | None = None  # symlinks
    extra: dict = field(default_factory=dict)  # fields a later writer added (kept on rewrite)

    def to_json(self) -> dict:
        d = dict(self.extra)
        d.update({"path": self.path, "type": self.type, "mode": self.mode})
        if self.type == "file":
            d["size"] = self.size
            d["blake3"] = self.blake3
        else:
            d["target"] = self.target
        return d


# Trees are flat lists of entries: 32 MiB holds ~150,000 files. A bigger one is refused on
# pull and reported by gc and verify (spec/format.md, "Size caps").
TREE_MAX = 32 << 20


@dataclass
class Tree:
    entries: list[TreeEntry] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: not regular files or links

    @property
    def files(self) -> int:
        return sum(1 for e in self.entries if e.type == "file")

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries if e.type == "file")

    def addresses(self) -> set[str]:
        return {e.blake3 for e in self.entries if e.type == "file" and e.blake3}

    def get(self, path: str) -> TreeEntry | None:
        path = safe_relpath(path)  # the query path: refuses ../ and absolute paths
        for e in self.entries:
            if e.path == path:
                return e
        return None

    def to_bytes(self) -> bytes:
        doc: dict = {
            "schema": TREE_SCHEMA,
            "entries": [e.to_json() for e in sorted(self.entries, key=lambda e: e.path)],
        }
        if self.skipped:
            doc["skipped"] = sorted(self.skipped, key=lambda s: s["path"])
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def load(cls, store: "BlobStore", address: str) -> "Tree":
        """The tree stored at ``address``, read verified and at most TREE_MAX bytes (TooLarge
        beyond, raised while decompressing: a tiny frame of a huge tree never fills memory)."""
        return cls.from_bytes(store.read_bytes(address, limit=TREE_MAX))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Tree":
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptManifest(f"artifact tree is not valid JSON: {e}") from None
        except RecursionError:
            raise CorruptManifest("artifact tree is nested too deeply to be a tree") from None
        if not isinstance(doc, dict) or doc.get("schema") != TREE_SCHEMA:
            raise CorruptManifest(f"artifact tree has unknown schema {doc.get('schema') if isinstance(doc, dict) else None!r}")
        entries = []
        for raw in doc.get("entries", []):
            known = {"path", "type", "mode", "size", "blake3", "target"}
            extra = {k: v for k, v in raw.items() if k not in known}
            kind = raw.get("type")
            if kind not in ("file", "symlink"):
                raise CorruptManifest(f"artifact tree entry has unknown type {kind!r}")
            path = raw.get("path")
            if not isinstance(path, str):
                raise CorruptManifest("artifact tree entry has no path")
            # Paths are kept as written: materialize() refuses unsafe ones entry by entry.
            try:
                if kind == "file":
                    entries.append(
                        TreeEntry(path, "file", int(raw.get("mode", 0o644)), int(raw["size"]), validate_address(raw["blake3"]), extra=extra)
                    )
                else:
                    entries.append(TreeEntry(path, "symlink", int(raw.get("mode", 0o777)), target=str(raw["target"]), extra=extra))
            except (KeyError, TypeError, ValueError, InvalidAddress) as e:
                raise CorruptManifest(f"artifact tree entry {path!r} is malformed: {e}") from None
        return cls(entries, list(doc.get("skipped", [])))

    def store(self, sink: "BlobStore | Batch") -> str:
        return sink.put_bytes(self.to_bytes()).address


def collect(
    directory: str | os.PathLike,
    sink: "BlobStore | Batch",
    *,
    exclude: set[str] | frozenset[str] = frozenset(),
    redactor: "Redactor | None" = None,
    policy: str = "redact",
) -> Tree:
    """Ingest every regular file under ``directory`` into ``sink`` and return the tree.

    Symlinks are recorded (target text), not followed; other file types (fifos, sockets,
    devices) and names that are not valid UTF-8 are listed in ``skipped``. Paths in
    ``exclude`` (plugins' choice) are left out.

    With a ``redactor``, ``policy`` decides what happens to a file holding a secret: a
    declared value (in any file) or a detector match (in a text file). ``redact`` stores the
    redacted text (binary files: each value masked byte for byte with ``*``), ``flag`` stores
    the file unchanged, ``reject`` leaves it out. A file is stored as it was read while
    scanning, never read twice. The entry's ``secrets`` field records what happened. Paths
    and symlink targets pass the redactor too, whatever the policy.
    """
    tree = Tree()
    try:
        top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return tree
    scan = _Scanner(redactor, policy) if redactor is not None and (redactor.values or redactor.patterns) else None
    try:
        _walk(top, "", sink, tree, {safe_relpath(p) for p in exclude}, scan)
    finally:
        os.close(top)
    if redactor is not None:
        _redact_names(tree, redactor)
    tree.entries.sort(key=lambda e: e.path)
    return tree


def _redact_names(tree: Tree, redactor: "Redactor") -> None:
    """Mask secrets in paths and symlink targets (the tree is listed by ``artifacts``).

    The whole path is redacted, so a link and the file it names stay consistent. An entry
    whose masked path equals another entry's is left out (listed in ``skipped``).
    """
    from dataclasses import replace

    renamed: list[TreeEntry] = []
    kept: list[TreeEntry] = []
    for e in tree.entries:
        path = redactor.text(e.path)
        target = redactor.text(e.target) if e.target is not None else None
        if path == e.path and target == e.target:
            kept.append(e)
        else:
            renamed.append(replace(e, path=path, target=target, extra={**e.extra, "name_redacted": True}))
    taken = {e.path for e in kept}
    for e in renamed:
        if e.path in taken:
            tree.skipped.append({"path": e.path, "reason": "its name, with secrets masked, is another entry's name"})
            continue
        taken.add(e.path)
        kept.append(e)
    tree.entries = kept
    tree.skipped = [{**s, "path": redactor.text(s["path"])} for s in tree.skipped]


class _Scanner:
    """``artifact_policy`` for one file: declared values, and the detectors in text files.

    Binary files (:func:`casruns.redaction.looks_binary`) are scanned for the declared
    values too, raw, encoded and in UTF-16; ``redact`` masks each match byte for byte with
    ``*`` so the file keeps its size and layout (offsets, length fields), ``reject`` leaves
    the file out. The binary test only picks the way of redacting, never whether to.
    """

    def __init__(self, redactor: "Redactor", policy: str) -> None:
        self.redactor = redactor
        self.policy = policy

    def ingest(self, f, sink) -> tuple[object | None, dict]:
        """Returns (BlobInfo or None if rejected, entry extras)."""
        import tempfile

        from .redaction import BINARY_SNIFF, looks_binary

        head = f.read(BINARY_SNIFF)
        binary = looks_binary(head)
        if binary and not self.redactor.values:  # nothing to look for: store it without a copy
            f.seek(0)
            return _put(f, sink), {}
        stream = self.redactor.binary_stream() if binary else self.redactor.stream()
        keep = self.policy == "flag"  # store the bytes as read; the stream only counts
        with tempfile.SpooledTemporaryFile(max_size=SMALL) as out:
            chunk = head
            while chunk:
                masked = stream.feed(chunk)
                out.write(chunk if keep else masked)
                chunk = f.read(SMALL)
            masked = stream.close()
            if not keep:
                out.write(masked)
            # What is stored is what was scanned (never a second read of a file that may grow).
            hits = stream.hits
            if not hits:
                return _put(out, sink), {}
            found = {"secret_matches": sum(hits.values()), "secret_names": sorted(hits)}
            if binary:
                found["binary"] = True
            if self.policy == "reject":
                names = ", ".join(f"{k} {v}" for k, v in sorted(hits.items()))
                return None, {"reason": f"contains secrets ({names}); artifact_policy is reject", **found}
            return _put(out, sink), {"secrets": "flagged" if keep else "redacted", **found}


def _put(f, sink):
    """Store a seekable file object from its start: small ones in one piece, others streamed."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= SMALL:
        return sink.put_bytes(f.read())
    return sink.put_stream(f, size=None)  # the file may still be growing: do not promise a size


MAX_DEPTH = 128


def _walk(top_fd: int, _prefix: str, sink, tree: Tree, exclude: set[str], scan: "_Scanner | None") -> None:
    """Depth first without recursion: at most one open descriptor per directory level."""
    stack: list[tuple[int, Iterator[str], str, int]] = []

    def push(fd: int, prefix: str, depth: int) -> None:
        with os.scandir(fd) as it:
            names = sorted(e.name for e in it)
        stack.append((fd, iter(names), prefix, depth))

    push(os.dup(top_fd), "", 0)
    try:
        while stack:
            dir_fd, names, prefix, depth = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(dir_fd)
                stack.pop()
                continue
            sub = _visit(dir_fd, name, prefix, depth, sink, tree, exclude, scan)
            if sub is not None:
                push(sub, f"{prefix}{name}/", depth + 1)
    finally:
        for fd, *_ in stack:
            os.close(fd)


def _visit(dir_fd, name, prefix, depth, sink, tree, exclude, scan) -> int | None:
    """Handle one directory entry; returns an open descriptor if it is a directory to enter."""
    rel = f"{prefix}{name}"
    if rel in exclude:
        return None
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        tree.skipped.append({"path": _printable(rel), "reason": "name is not valid UTF-8"})
        return None
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None  # removed while we walked
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            tree.skipped.append({"path": rel, "reason": "symlink target is not valid UTF-8"})
            return None
        tree.entries.append(TreeEntry(rel, "symlink", 0o777, target=target))
    elif stat.S_ISDIR(st.st_mode):
        if depth + 1 > MAX_DEPTH:
            tree.skipped.append({"path": rel, "reason": f"deeper than {MAX_DEPTH} directories"})
            return None
        try:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            tree.skipped.append({"path": rel, "reason": f"cannot open directory: {e.strerror}"})
            return None
        return sub
    elif stat.S_ISREG(st.st_mode):
        try:
            # replaced by a FIFO since the stat: O_NONBLOCK, so the open does not wait for a writer
            fd = fsutil.open_regular(name, dir_fd=dir_fd)
        except StrayFile:
            tree.skipped.append({"path": rel, "reason": "changed type while collected"})
            return None
        except OSError as e:
            tree.skipped.append({"path": rel, "reason": f"cannot open: {e.strerror}"})
            return None
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            if scan is not None:
                info, extra = scan.ingest(f, sink)
                if info is None:
                    tree.skipped.append({"path": rel, **extra})
                    return None
            else:
                info, extra = _put(f, sink), {}
        tree.entries.append(TreeEntry(rel, "file", stat.S_IMODE(fst.st_mode), info.size, info.address, extra=extra))
    else:
        tree.skipped.append({"path": rel, "reason": "not a regular file, directory or symlink"})
    return None


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def blob_refs(
    store: "BlobStore", m: dict, unreadable: list | None = None, *, missing_tree_is_error: bool = False
) -> Iterator[tuple[str, str]]:
    """``(where, address)`` for every blob a run's manifest references: ``logs.<stream>``,
    ``artifacts.tree``, then ``artifacts/<path>`` for each file its tree lists. The one walker
    gc's mark, verify and archive push use. (``scan`` reads content, not addresses, and a pull
    must import a tree before it can read it: both read the tree themselves.)

    A missing tree yields only its own address (the caller decides what missing means; with
    ``missing_tree_is_error`` it is reported like an unreadable one). A tree that cannot be
    read, parsed, or is over its cap: appended to ``unreadable`` (as ``{run_id, address, code,
    message}``) when a list is given, else the error is raised. Reading the tree verifies it.
    """
    from .errors import BlobNotFound, CasrunsError

    for stream, ref in (m.get("logs") or {}).items():
        if isinstance(ref, dict) and ref.get("blake3"):
            yield f"logs.{stream}", ref["blake3"]
    tree_ref = (m.get("artifacts") or {}).get("tree")
    if not tree_ref:
        return
    yield "artifacts.tree", tree_ref
    try:
        tree = Tree.load(store, tree_ref)
    except BlobNotFound as e:
        if missing_tree_is_error and unreadable is not None:
            unreadable.append({"run_id": m.get("run_id"), "address": tree_ref, "code": e.code, "message": e.message})
        return
    except CasrunsError as e:
        if unreadable is None:
            raise
        unreadable.append({"run_id": m.get("run_id"), "address": tree_ref, "code": e.code, "message": e.message})
        return
    for e in tree.entries:
        if e.type == "file" and e.blake3:
            yield f"artifacts/{e.path}", e.blake3


def materialize(tree: Tree, store: "BlobStore", dest: str | os.PathLike, progress=None) -> dict:
    """Write a tree's files under ``dest``; refuse anything that would land outside it.

    Returns ``{"files": n, "symlinks": n, "bytes": n, "refused": [{"path", "reason"}]}``.
    Each file is verified against its address before it appears at its final name.
    """
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    report = {"files": 0, "symlinks": 0, "bytes": 0, "refused": []}
    created: list[tuple[str, str]] = []
    for i, e in enumerate(tree.entries):
        if progress:
            progress("exporting", i + 1, len(tree.entries))
        try:
            rel = safe_relpath(e.path)
            parent = _safe_parent(dest, rel)
        except UnsafePath as err:
            report["refused"].append({"path": e.path, "reason": err.message})
            continue
        target_path = os.path.join(parent, rel.rsplit("/", 1)[-1])
        if os.path.islink(target_path):
            report["refused"].append({"path": e.path, "reason": "a symlink already stands at that path"})
            continue
        if e.type == "file":
            assert e.blake3 is not None
            # never group- or world-writable, whatever a (pulled, crafted) tree says
            report["bytes"] += store.copy_to(e.blake3, target_path, mode=(e.mode & 0o755) or 0o600)
            report["files"] += 1
        else:
            assert e.target is not None
            if os.path.isabs(e.target):
                report["refused"].append({"path": e.path, "reason": f"symlink target {e.target!r} is absolute"})
                continue
            resolved = os.path.normpath(os.path.join(os.path.dirname(os.path.join(dest, rel)), e.target))
            if resolved != dest and not resolved.startswith(dest + os.sep):
                report["refused"].append({"path": e.path, "reason": f"symlink target {e.target!r} escapes the destination"})
                continue
            if os.path.lexists(target_path):
                os.unlink(target_path)
            os.symlink(e.target, target_path)
            created.append((e.path, target_path))
    # Links can chain (b -> ".", c -> "b/..", ...): judge each by where it finally resolves,
    # once all exist; removing one can change where others resolve, so repeat until stable.
    kept = list(created)
    changed = True
    while changed:
        changed = False
        for path, link in list(kept):
            resolved = os.path.realpath(link)
            if not (resolved == dest or resolved.startswith(dest + os.sep)):
                os.unlink(link)
                kept.remove((path, link))
                report["refused"].append({"path": path, "reason": "symlink resolves outside the destination"})
                changed = True
    report["symlinks"] = len(kept)
    return report


def _safe_parent(dest: str, rel: str) -> str:
    """Create the parent directories of ``rel`` under ``dest``, refusing symlinked components."""
    parts = rel.split("/")[:-1]
    cur = dest
    for part in parts:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise UnsafePath(f"path {rel!r} passes through a symlink at {part!r}")
        if not os.path.isdir(cur):
            if os.path.lexists(cur):
                raise UnsafePath(f"path {rel!r} passes through a file at {part!r}")
            os.mkdir(cur, 0o755)
    return cur
