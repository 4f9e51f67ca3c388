"""The opened registry: a root directory, its format record, config, store, plugins and runs.

Everything below the behaviour modules needs one thing to stand on: where the registry is,
whether it exists and in which format, its config, its blob store, its plugins, its run
directories, and the policy that builds a redactor from the config. :class:`RegistryRoot` is
that, and nothing more; ``gc``, ``verify``, ``archive``, ``scan``, ``recovery``, ``intake``,
``query``, ``replay``, ``actions`` and ``evidence`` take it, and :class:`casruns.Registry`
(the facade) is one. Nothing is created until a write; the query path imports neither
zstandard nor blake3 nor plugins: those load on first use of :attr:`store` or :attr:`plugins`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping

from . import fsutil
from .config import FORMAT_FILE, FORMAT_NAME, FORMAT_VERSION, Config, packs_for, read_format
from .errors import CasrunsError
from .runs import RunDir, iter_run_ids
from .timefmt import now_ts

TYPE_CHECKING = False  # typing costs 3 ms on the status path; this spelling costs nothing
if TYPE_CHECKING:
    from .store import DiskStore


def default_root() -> str:
    """``CASRUNS_HOME``, else ``$XDG_DATA_HOME/casruns``, else ``~/.local/share/casruns``."""
    home = os.environ.get("CASRUNS_HOME")
    if home:
        return os.path.abspath(home)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "casruns")


REGISTRY_ID_FILE = "registry-id"


class RegistryRoot:
    """An opened registry directory. Cheap to construct; nothing is created until a write."""

    def __init__(self, root: str | os.PathLike | None = None, *, plugins: Iterable[str] = ()) -> None:
        self.root = os.path.abspath(os.fspath(root)) if root is not None else default_root()
        self.extra_plugins = list(plugins)
        self._plugins = None
        self.runs_dir = os.path.join(self.root, "runs")
        self._config: Config | None = None
        self._store: DiskStore | None = None
        self._checked = False
        self._version = FORMAT_VERSION

    @property
    def config(self) -> Config:
        if self._config is None:
            self.check_format()
            self._config = Config.load(self.root)
        return self._config

    @property
    def store(self) -> "DiskStore":
        if self._store is None:
            from .store import DiskStore

            self._store = DiskStore(os.path.join(self.root, "blobs"), packing=packs_for(self.format_version))
        return self._store

    @property
    def plugins(self):
        """The loaded plugin manager (entry points, config ``plugins``, ``plugins=`` given here)."""
        if self._plugins is None:
            from .plugins import load

            self._plugins = load(self.plugin_modules())
        return self._plugins

    def plugin_modules(self) -> list[str]:
        cfg = self.config.plugins if self.check_format() else []
        return list(dict.fromkeys([*cfg, *self.extra_plugins]))

    def check_format(self) -> bool:
        """True if the registry exists; raises on a newer major format."""
        if self._checked:
            return True
        doc = read_format(self.root)
        if doc is None:
            return False
        self._version = doc["version"]
        self._checked = True
        return True

    @property
    def format_version(self) -> int:
        """The registry's format version (the current one for a registry not created yet)."""
        return self._version if self.check_format() else FORMAT_VERSION

    def migrate(self) -> dict:
        """Move an older registry to the current format, explicitly (spec/format.md, "Changes
        between versions"). Format 1 to 2 changes no file but the format record: format 2 adds
        packs, which a format-1 reader would not see, so only the record tells it to stop."""
        if not self.check_format():
            from .errors import RegistryError

            raise RegistryError(f"no registry at {self.root}; nothing to migrate (casruns init creates one)", path=self.root)
        old = self._version
        if old < FORMAT_VERSION:
            import tomli_w

            doc = read_format(self.root) or {}  # fields we do not know are kept, like in manifests
            doc.update(format=FORMAT_NAME, version=FORMAT_VERSION, migrated_at=now_ts())
            fsutil.atomic_write(os.path.join(self.root, FORMAT_FILE), tomli_w.dumps(doc).encode())
            self._version = FORMAT_VERSION
            self._store = None  # a store opened under format 1 must not keep writing loose-only
        return {"schema": "casruns/migrate/v1", "root": self.root, "from_version": old, "to_version": FORMAT_VERSION, "migrated": old < FORMAT_VERSION}

    def init(self) -> bool:
        """Create the registry (idempotent). Returns True if it was created now."""
        existed = self.check_format()
        if existed:
            return False
        if os.path.isdir(self.root) and any(not n.startswith(".") for n in os.listdir(self.root)):
            from .errors import RegistryError

            raise RegistryError(
                f"{self.root} exists, is not empty and is not a casruns registry; choose another --root or CASRUNS_HOME",
                path=self.root,
            )
        fsutil.ensure_dir(self.root)
        os.chmod(self.root, fsutil.DIR_MODE)
        for sub in ("blobs", "blobs/tmp", "blobs/packs", "runs", "queue", "locks", "slots"):
            fsutil.ensure_dir(os.path.join(self.root, sub))
        # All 256 shard directories now, with one directory sync, so that no blob write
        # ever pays for creating (and syncing) its shard.
        blobs = os.path.join(self.root, "blobs")
        for i in range(256):
            fsutil.ensure_dir(os.path.join(blobs, f"{i:02x}"), sync_parent=False)
        fsutil.fsync_dir(blobs)
        from .runs import journal_of

        journal_of(self.runs_dir).ensure()  # events/, with its full-disk reserve
        doc = f'format = "{FORMAT_NAME}"\nversion = {FORMAT_VERSION}\ncreated_at = "{now_ts()}"\n'
        fsutil.atomic_write(os.path.join(self.root, FORMAT_FILE), doc.encode())
        self.registry_id  # made now, so a registry has its id before its first run
        self._checked = True
        self._version = FORMAT_VERSION
        return True

    def ensure(self) -> None:
        if not self.check_format():
            self.init()

    @property
    def registry_id(self) -> str:
        """This registry's stable id (``<root>/registry-id``, 16 hex digits), made by the first
        writer that asks: runs record it as their ``origin``, so a fleet archive can say where
        each ran. Two writers racing agree on one (the file appears by a link, never replaced)."""
        path = os.path.join(self.root, REGISTRY_ID_FILE)
        try:
            text = fsutil.read_regular(path, 64).decode("ascii", "replace").strip()
        except FileNotFoundError:
            text = ""
        if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
            return text
        if text:
            from .errors import RegistryError

            raise RegistryError(f"{path} does not hold a registry id (16 hex digits)", path=path)
        tmp = os.path.join(self.root, fsutil.temp_name(REGISTRY_ID_FILE))
        fsutil.atomic_write(tmp, os.urandom(8).hex().encode() + b"\n")
        try:
            os.link(tmp, path)  # fails if another writer made it first: then theirs is the id
            fsutil.fsync_dir(self.root)
        except FileExistsError:
            pass
        finally:
            fsutil.unlink_quiet(tmp)
        return self.registry_id

    def run_dir(self, run_id: str) -> RunDir:
        return RunDir(self.runs_dir, run_id)

    def redactor(self, values: Mapping[str, str] | None = None):
        """A redactor with ``values`` and the detectors the config leaves on."""
        from .redaction import policy

        return policy((self.config.raw.get("redaction") or {}) if self.check_format() else {}, values)

    def keep_last_protected(self) -> dict[str, str]:
        from .retention import keep_last_protected

        return keep_last_protected(self.iter_manifests(), self.config)

    def iter_manifests(self) -> Iterator[dict]:
        for rid in iter_run_ids(self.runs_dir):
            try:
                yield self.run_dir(rid).read()
            except CasrunsError:
                continue

    # kept for embedders of casruns 0.2 that called the private spelling
    _check_format = check_format
    _ensure = ensure
