"""``casruns.Registry``: the facade the CLI and embedders use.

Everything a user can do to a registry is a method here; the CLI only parses arguments,
calls one of these and renders the result. Nothing here imports click, and the query path
(``get``, ``list``) imports neither zstandard nor blake3 nor plugins: those load on first
use of :attr:`store` (collecting, reading logs) so that polling stays cheap.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping

from . import fsutil, locking, scheduler
from . import manifest as mf
from . import record as rec
from .config import FORMAT_FILE, FORMAT_NAME, FORMAT_VERSION, PACKS_SINCE, Config, read_format
from .errors import (
    ArtifactNotFound,
    CasrunsError,
    InvalidInput,
    NoSpace,
    RegistryError,
    RunIdConflict,
    RunNotFound,
    StrayFile,
    UnknownProvider,
)
from .ids import new_run_id, validate_run_id
from .runs import RunDir, RunExists, iter_run_ids, run_stray
from .timefmt import format_ts, now_ts, parse_duration, parse_ts

TYPE_CHECKING = False  # typing costs 3 ms on the status path; this spelling costs nothing
if TYPE_CHECKING:
    from .store import DiskStore
    from .tree import Tree

LOG_STREAMS = ("stdout", "stderr", "transcript")
MAX_RESTARTS = 3  # a queued run whose supervisor died this often before starting it is failed
FOLLOW_POLL = 0.2


def default_root() -> str:
    """``CASRUNS_HOME``, else ``$XDG_DATA_HOME/casruns``, else ``~/.local/share/casruns``."""
    home = os.environ.get("CASRUNS_HOME")
    if home:
        return os.path.abspath(home)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "casruns")


class Registry:
    """A registry directory. Cheap to construct; nothing is created until a write."""

    def __init__(self, root: str | os.PathLike | None = None, *, plugins: Iterable[str] = ()) -> None:
        self.root = os.path.abspath(os.fspath(root)) if root is not None else default_root()
        self.extra_plugins = list(plugins)
        self._plugins = None
        self.runs_dir = os.path.join(self.root, "runs")
        self._config: Config | None = None
        self._store: DiskStore | None = None
        self._checked = False
        self._version = FORMAT_VERSION

    # -- opening -----------------------------------------------------------------------
    @property
    def config(self) -> Config:
        if self._config is None:
            self._check_format()
            self._config = Config.load(self.root)
        return self._config

    @property
    def store(self) -> "DiskStore":
        if self._store is None:
            from .store import DiskStore

            self._store = DiskStore(os.path.join(self.root, "blobs"), packing=self.format_version >= PACKS_SINCE)
        return self._store

    @property
    def plugins(self):
        """The loaded plugin manager (entry points, config ``plugins``, ``plugins=`` given here)."""
        if self._plugins is None:
            from .plugins import load

            self._plugins = load(self.plugin_modules())
        return self._plugins

    def plugin_modules(self) -> list[str]:
        cfg = self.config.plugins if self._check_format() else []
        return list(dict.fromkeys([*cfg, *self.extra_plugins]))

    def _check_format(self) -> bool:
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
        return self._version if self._check_format() else FORMAT_VERSION

    def migrate(self) -> dict:
        """Move an older registry to the current format, explicitly (spec/format.md, "Changes
        between versions"). Format 1 to 2 changes no file but the format record: format 2 adds
        packs, which a format-1 reader would not see, so only the record tells it to stop."""
        if not self._check_format():
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
        existed = self._check_format()
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
        doc = f'format = "{FORMAT_NAME}"\nversion = {FORMAT_VERSION}\ncreated_at = "{now_ts()}"\n'
        fsutil.atomic_write(os.path.join(self.root, FORMAT_FILE), doc.encode())
        self._checked = True
        self._version = FORMAT_VERSION
        return True

    def _ensure(self) -> None:
        if not self._check_format():
            self.init()

    def run_dir(self, run_id: str) -> RunDir:
        return RunDir(self.runs_dir, run_id)

    # -- submit ------------------------------------------------------------------------
    def submit(
        self,
        argv: list[str],
        *,
        provider: str = "shell",
        timeout: str | float | None = None,
        labels: Mapping[str, str] | None = None,
        env: Iterable[str] = (),
        secret_env: Iterable[str] = (),
        cwd: str | None = None,
        recipe: str | None = None,
        run_id: str | None = None,
        retain_for: str | float | None = None,
        environ: Mapping[str, str] | None = None,
        spawn: bool = True,
        _chain: Mapping | None = None,
    ) -> dict:
        """Record a run as queued, start its supervisor, return its record at once.

        ``env`` items are ``NAME=VALUE`` or ``NAME`` (taken from ``environ``); ``secret_env``
        names are read from ``environ`` and their values only ever reach the supervisor's
        memory. With a caller-chosen ``run_id``, submitting the same request again returns
        the existing run; a different request under that id raises RunIdConflict.
        """
        environ = os.environ if environ is None else environ
        try:
            return self._submit(
                argv, provider=provider, timeout=timeout, labels=labels, env=env, secret_env=secret_env, cwd=cwd,
                recipe=recipe, run_id=run_id, retain_for=retain_for, environ=environ, spawn=spawn, _chain=_chain,
            )
        except CasrunsError as e:
            # An error about --cwd, --timeout, --run-id, --provider, a label or a plugin may quote
            # a value that holds a declared secret: it passes the redactor before anyone sees it.
            from .redaction import split_secrets

            declared = {n: environ[n] for n in secret_env if isinstance(n, str) and n in environ}
            used = split_secrets(declared)[0]
            if used:
                redactor = self.redactor(used)
                e.message = redactor.text(e.message)
                e.details = redactor.metadata(e.details)
                e.args = (e.message,)
            raise

    def _submit(self, argv, *, provider, timeout, labels, env, secret_env, cwd, recipe, run_id, retain_for, environ, spawn, _chain) -> dict:
        argv = [str(a) for a in argv]
        if not argv or not argv[0]:
            raise InvalidInput("no command given: put it after --, e.g. casruns submit -- make test")
        providers = self.plugins.providers()
        if provider not in providers:
            raise UnknownProvider(f"unknown provider {provider!r}; available: {', '.join(sorted(providers)) or 'none'}")
        labels = dict(labels or {})
        for k, v in labels.items():
            _check_label(k, v)
        timeout_s = parse_duration(timeout) if timeout not in (None, "") else None
        if timeout_s is not None and timeout_s <= 0:
            raise InvalidInput("--timeout must be greater than zero")
        retain_s = parse_duration(retain_for) if retain_for not in (None, "") else None
        env_values: dict[str, str] = {k: environ[k] for k in _base_env_names() if k in environ}
        env_names: list[str] = []
        for item in env:
            name, sep, value = item.partition("=")
            _check_env_name(name)
            if not sep:
                if name not in environ:
                    raise InvalidInput(f"--env {name}: no such variable in the environment")
                value = environ[name]
            env_values[name] = value
            env_names.append(name)
        secrets: dict[str, str] = {}
        for name in secret_env:
            _check_env_name(name)
            if name not in environ:
                raise InvalidInput(f"--secret-env {name}: no such variable in the environment")
            secrets[name] = environ[name]
        cwd = os.path.abspath(cwd) if cwd else os.getcwd()
        if not os.path.isdir(cwd):
            raise InvalidInput(f"--cwd {cwd}: not a directory")
        rid = validate_run_id(run_id) if run_id else new_run_id()

        from .redaction import split_secrets

        used, ignored = split_secrets(secrets)
        request = {
            "argv": argv,
            "cwd": cwd,
            "env_names": sorted(set(env_names)),
            "secret_env": sorted(secrets),
            "timeout": timeout_s,
            "recipe": recipe,
            "plugins": self.plugin_modules(),
        }
        # The request's fingerprint, for idempotent resubmission. Salted per run: a bare hash
        # of argv and labels would let anyone who reads the manifest test guesses of a secret.
        canon = json.dumps({"request": request, "provider": provider, "labels": labels, "retain_for": retain_s}, sort_keys=True)
        salt = os.urandom(16).hex()
        request["hash_salt"] = salt
        request["hash"] = _fingerprint(salt, canon)
        now = time.time()
        m = {
            "schema": mf.SCHEMA,
            "run_id": rid,
            "status": mf.QUEUED,
            "created_at": format_ts(now),
            "created_ns": time.time_ns(),
            "updated_at": format_ts(now),
            "provider": provider,
            "attempt": int((_chain or {}).get("attempt", 1)),
            "resumed_from": (_chain or {}).get("resumed_from"),
            "replay_of": (_chain or {}).get("replay_of"),
            "submitted_by": {"host": locking.hostname(), "pid": os.getpid()},
            "labels": labels,
            "request": request,
            "retention": {"promoted": False, "retain_for": retain_s},
        }
        if ignored:
            m["redaction"] = {"ignored_secrets": ignored}
        self._ensure()
        # Redact the request itself: a secret typed into argv or a label never reaches the
        # manifest. The supervisor then gets the real argv in memory only.
        redactor = self.redactor(used)
        request["argv"] = [redactor.text(a) for a in argv]
        m["labels"] = redactor.metadata(labels)
        umask = os.umask(0o077)
        os.umask(umask)
        payload = {"env": env_values, "secret_env": secrets, "umask": umask}
        if request["argv"] != argv:
            # the redactor stores text: bytes that are not UTF-8 come back replaced. That alone
            # is a lossy record, not a secret (replay says which), and the command still gets
            # the exact bytes from the payload.
            plain = [a.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for a in argv]
            request["argv_lossy" if request["argv"] == plain else "argv_redacted"] = True
            payload["argv"] = argv
        for k, v in ((_chain or {}).get("env") or {}).items():  # resume: CASRUNS_RESUMED_FROM, plugin env
            payload["env"][k] = str(v)
        # what a restart by reap needs to run it exactly as submitted (secrets aside: those fail it)
        # A --env value may embed a declared secret (DATABASE_URL=postgres://app:$TOKEN@db): env.json
        # then stores it redacted and says so, and a restart by reap fails the run rather than run
        # it with the masked value, as for a redacted argv.
        stored_env = {k: redactor.text(v) for k, v in env_values.items()}
        if stored_env != env_values:
            request["env_redacted"] = sorted(k for k in env_values if stored_env[k] != env_values[k])
        env_file = json.dumps({"env": stored_env, "umask": umask}).encode()
        try:
            run, lock = _create(self.runs_dir, m, env_file)
        except RunExists:
            existing = self.run_dir(rid).read()
            old = existing.get("request") or {}
            if old.get("hash") != _fingerprint(old.get("hash_salt", ""), canon):
                raise RunIdConflict(
                    f"run id {rid} already names a run submitted with a different request", run_id=rid
                ) from None
            return self.get(rid)
        try:
            seed = (_chain or {}).get("seed_tree")
            if seed:
                # a resumed attempt starts from the earlier attempt's artifacts, materialized
                # from the store (collecting them again later dedups to the same blobs)
                from .tree import Tree, materialize

                materialize(Tree.load(self.store, seed), self.store, run.artifacts_dir)
            scheduler.enqueue(self.root, rid, m["created_ns"])
            if spawn:
                from . import supervisor

                supervisor.spawn(self.root, rid, payload, lock.fd)
        except Exception as e:
            with run.update() as mm:
                mm["error"] = {"code": "spawn_failed", "message": f"cannot start supervisor: {e}"}
                mf.transition(mm, mf.FAILED, now_ts())
            scheduler.dequeue(self.root, rid)
        finally:
            lock.release()
        return self.get(rid, reap=False)

    def redactor(self, values: Mapping[str, str] | None = None):
        """A redactor with ``values`` and the detectors the config leaves on."""
        from .redaction import DETECTORS, Redactor

        raw = (self.config.raw.get("redaction") or {}) if self._check_format() else {}
        switches = raw.get("detectors") or {}
        patterns = {**DETECTORS, **(raw.get("patterns") or {})}
        return Redactor(values or {}, {k: v for k, v in patterns.items() if switches.get(k, True)})

    # -- queries -----------------------------------------------------------------------
    def manifest(self, run_id: str) -> dict:
        if not self._check_format():
            raise RunNotFound(f"no run {validate_run_id(run_id)}: registry {self.root} does not exist", run_id=run_id)
        return self.run_dir(run_id).read()

    def get(self, run_id: str, *, reap: bool = True) -> dict:
        """The run's record (``casruns/run/v1``); reaps it first if its supervisor is lost."""
        run = self.run_dir(run_id)
        m = self.manifest(run_id)
        kept_by = None
        keep = self.config.keep_last
        if keep and m["status"] in mf.TERMINAL and any(k in (m.get("labels") or {}) for k in keep):
            from .retention import retention_of

            if retention_of(m, self.config)["cleanup_eligible"]:
                # only a run whose time is up can be kept by keep-last, and knowing whether
                # it is needs every run: status pays that only then
                kept_by = self.keep_last_protected().get(run_id)
        return self._record(run, m, reap=reap, kept_by=kept_by)

    def keep_last_protected(self) -> dict[str, str]:
        from .retention import keep_last_protected

        return keep_last_protected(self._all_manifests(), self.config)

    def _all_manifests(self) -> Iterator[dict]:
        for rid in iter_run_ids(self.runs_dir):
            try:
                yield self.run_dir(rid).read()
            except CasrunsError:
                continue

    def _record(self, run: RunDir, m: dict, *, reap: bool = True, kept_by: str | None = None) -> dict:
        hb = act = None
        if m["status"] not in mf.TERMINAL:
            reaped = None
            if reap and m["status"] in mf.ACTIVE and self._lost(run, m):
                try:
                    reaped = self.reap_lost(run)
                except NoSpace:
                    pass  # a read never needs free space: answer with the record as it stands
            if reaped is not None:
                m = reaped
            else:
                hb = run.mtime("heartbeat")
                act = run.last_activity()
        return rec.build(m, self.config, heartbeat=hb, activity=act, kept_by=kept_by)

    def _lost(self, run: RunDir, m: dict) -> bool:
        """True if the run's supervisor is provably gone (or silent too long on another host)."""
        if run.is_supervised():
            return False
        sup = m.get("supervisor") or {}
        if sup.get("host") and sup.get("host") != locking.hostname():
            hb = run.mtime("heartbeat") or 0.0
            return time.time() - hb > self.config.lost_after
        return True

    def list(
        self,
        *,
        statuses: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        since: str | None = None,
        limit: int | None = None,
        promoted: bool | None = None,
        reap: bool = True,
        errors: list | None = None,
    ) -> list[dict]:
        """Records newest first, filtered by status (any of), labels (all of), creation time."""
        statuses = set(statuses)
        for s in statuses:
            if s not in mf.STATUSES:
                raise InvalidInput(f"unknown status {s!r}; one of: {', '.join(mf.STATUSES)}")
        labels = dict(labels or {})
        since_ts = None
        if since:
            from .timefmt import parse_time_or_ago

            since_ts = parse_time_or_ago(since)
        if limit is not None and limit < 0:
            raise InvalidInput("--limit must not be negative")
        if not self._check_format():
            return []
        found: list[tuple[str, str, RunDir, dict]] = []
        everything: list[dict] = []
        for rid in iter_run_ids(self.runs_dir):
            run = self.run_dir(rid)
            try:
                m = run.read()
            except (RunNotFound, StrayFile):
                continue  # removed while we listed; or a stray, which readers skip (verify reports it)
            except CasrunsError as e:
                # one unreadable manifest must not hide every other run
                if errors is not None:
                    errors.append({"run_id": rid, "code": e.code, "message": e.message})
                continue
            everything.append(m)
            if labels and any((m.get("labels") or {}).get(k) != v for k, v in labels.items()):
                continue
            if since_ts is not None and parse_ts(m.get("created_at") or "1970-01-01T00:00:00Z") < since_ts:
                continue
            if promoted is not None and bool((m.get("retention") or {}).get("promoted")) != promoted:
                continue
            found.append((m.get("created_at", ""), rid, run, m))
        found.sort(key=lambda t: (t[0], t[1]), reverse=True)
        from .retention import keep_last_protected

        kept = keep_last_protected(everything, self.config)
        out = []
        for _, _, run, m in found:
            try:
                r = self._record(run, m, reap=reap, kept_by=kept.get(m["run_id"]))
            except CasrunsError as e:  # a malformed field in one manifest hides only that run
                if errors is not None:
                    errors.append({"run_id": m["run_id"], "code": "manifest_corrupt", "message": e.message})
                continue
            if statuses and r["status"] not in statuses:
                continue
            out.append(r)
            if limit is not None and len(out) >= limit:
                break
        return out

    def wait(self, run_ids: list[str], *, timeout: float | None = None, poll: float = 0.2) -> tuple[list[dict], bool]:
        """Block until every run is terminal. Returns (records, all_terminal)."""
        for rid in run_ids:
            self.manifest(rid)  # unknown ids fail before we wait
        deadline = None if timeout is None else time.monotonic() + timeout
        last_check = 0.0
        while True:
            records = [self.get(rid) for rid in run_ids]
            if all(r["terminal"] for r in records):
                return records, True
            if time.monotonic() - last_check > 5.0:
                # A queued run whose supervisor is gone would never end: restart it (or fail
                # it, if it cannot be restarted safely) as reap would, so wait always returns.
                last_check = time.monotonic()
                for r in records:
                    run = self.run_dir(r["run_id"])
                    if r["status"] == mf.QUEUED and not run.is_supervised():
                        time.sleep(0.05)  # the submitter hands its lock over; look twice
                        if not run.is_supervised() and run.read_fresh()["status"] == mf.QUEUED:
                            self._restart_queued(run, run.read_fresh())
            if deadline is not None and time.monotonic() >= deadline:
                return records, False
            time.sleep(poll)

    # -- cancel ------------------------------------------------------------------------
    def cancel(self, run_id: str, *, reason: str | None = None) -> tuple[dict, str]:
        """Cancel a run. Returns (record, outcome) with outcome one of
        ``cancelled`` (was queued: done now), ``requested`` (active: the supervisor stops it),
        ``already_requested`` or ``already_terminal`` (nothing changed)."""
        run = self.run_dir(run_id)
        self.manifest(run_id)
        reason = reason or "cancelled by user"
        with run.update() as m:
            if m["status"] in mf.TERMINAL:
                outcome = "already_terminal"
            elif m.get("cancel"):
                outcome = "already_requested"
            else:
                m["cancel"] = {"requested_at": now_ts(), "reason": reason}
                if m["status"] == mf.QUEUED:
                    mf.transition(m, mf.CANCELLED, now_ts())
                    m["error"] = {"code": "cancelled", "message": reason}
                    outcome = "cancelled"
                else:
                    outcome = "requested"
            sup = m.get("supervisor") or {}
        if outcome in ("cancelled", "requested", "already_requested"):
            # after the commit: the marker never runs ahead of the record; touched again on a
            # repeated cancel, in case the first one died between its commit and this line
            fsutil.touch(run.cancel_path)
        if outcome == "cancelled":
            scheduler.dequeue(self.root, run_id)
        if outcome in ("cancelled", "requested", "already_requested") and locking.process_matches(sup.get("pid"), sup.get("start_time"), sup.get("boot_id")):
            try:
                os.kill(sup["pid"], __import__("signal").SIGUSR1)  # wake it; it reads the marker
            except OSError:
                pass
        if outcome == "requested" and self._lost(run, run.read_fresh()):
            self.reap_lost(run)
        return self.get(run_id), outcome

    # -- replay and resume ---------------------------------------------------------------
    def _recipe(self, run_id: str) -> tuple[dict, dict]:
        m = self.manifest(run_id)
        req = m.get("request") or {}
        if req.get("argv_redacted"):
            raise InvalidInput(
                f"run {run_id}'s command line held a secret and was stored redacted; it cannot be run again from its record"
            )
        if req.get("argv_lossy"):
            raise InvalidInput(
                f"run {run_id}'s command line held bytes that are not UTF-8 and was stored with them replaced; "
                "it cannot be run again exactly from its record"
            )
        return m, req

    def replay(self, run_id: str, *, run_id_new: str | None = None, environ: Mapping[str, str] | None = None, spawn: bool = True) -> dict:
        """Submit a new run from a run's recipe (secrets and env values read again from
        ``environ``), linked to it by ``replay_of``."""
        m, req = self._recipe(run_id)
        return self._resubmit(m, req, run_id_new=run_id_new, environ=environ, spawn=spawn, chain={"replay_of": run_id})

    def resume(self, run_id: str, *, environ: Mapping[str, str] | None = None, spawn: bool = True) -> dict:
        """Start attempt n+1 of a failed, timed-out or cancelled run, seeded with its artifacts.

        The command sees ``CASRUNS_RESUMED_FROM`` (the earlier run id) and ``CASRUNS_ATTEMPT``.
        A plugin may refuse (``{"refuse": why}``) or prepare it (``{"env": {...}}``)."""
        from .errors import InvalidTransition, PluginError

        m, req = self._recipe(run_id)
        if m["status"] not in (mf.FAILED, mf.TIMED_OUT, mf.CANCELLED):
            raise InvalidTransition(
                f"run {run_id} is {m['status']}; only a failed, timed_out or cancelled run can be resumed", run_id=run_id
            )
        attempt = int(m.get("attempt", 1)) + 1
        env = {"CASRUNS_RESUMED_FROM": run_id, "CASRUNS_ATTEMPT": str(attempt)}
        record = self.get(run_id)
        plugins = self._plugins_for(req)
        for plugin, res in plugins.call("casruns_resume", run=record, attempt=attempt):
            if isinstance(res, dict) and res.get("refuse"):
                raise PluginError(f"plugin {plugin} refused to resume run {run_id}: {res['refuse']}", plugin=plugin, hook="casruns_resume")
            if isinstance(res, dict):
                env.update({str(k): str(v) for k, v in (res.get("env") or {}).items()})
        chain = {
            "attempt": attempt,
            "resumed_from": run_id,
            "replay_of": m.get("replay_of"),
            "seed_tree": (m.get("artifacts") or {}).get("tree"),
            "env": env,
        }
        return self._resubmit(m, req, environ=environ, spawn=spawn, chain=chain)

    def _plugins_for(self, req: dict):
        recorded = [p for p in req.get("plugins") or [] if p not in self.plugin_modules()]
        if not recorded:
            return self.plugins
        return Registry(self.root, plugins=[*self.extra_plugins, *recorded]).plugins

    def _resubmit(self, m: dict, req: dict, *, environ, spawn: bool, chain: dict, run_id_new: str | None = None) -> dict:
        recorded = [p for p in req.get("plugins") or [] if p not in self.plugin_modules()]
        target = Registry(self.root, plugins=[*self.extra_plugins, *recorded]) if recorded else self
        return target.submit(
            list(req.get("argv") or []),
            provider=m.get("provider", "shell"),
            timeout=req.get("timeout"),
            labels=dict(m.get("labels") or {}),
            env=list(req.get("env_names") or []),
            secret_env=list(req.get("secret_env") or []),
            cwd=req.get("cwd"),
            recipe=req.get("recipe"),
            run_id=run_id_new,
            retain_for=(m.get("retention") or {}).get("retain_for"),
            environ=environ,
            spawn=spawn,
            _chain=chain,
        )

    def chain(self, run_id: str) -> list[dict]:
        """Every attempt of the run's chain (linked by ``resumed_from``), first attempt first."""
        m = self.manifest(run_id)
        by_id = {x["run_id"]: x for x in self._all_manifests()}
        root = m
        seen = {root["run_id"]}
        while root.get("resumed_from") in by_id and root["resumed_from"] not in seen:
            root = by_id[root["resumed_from"]]
            seen.add(root["run_id"])
        children: dict[str, list[dict]] = {}
        for x in by_id.values():
            if x.get("resumed_from"):
                children.setdefault(x["resumed_from"], []).append(x)
        out, todo = [], [root]
        while todo:
            cur = todo.pop(0)
            out.append(cur)
            todo.extend(sorted(children.get(cur["run_id"], []), key=lambda x: x.get("created_at", "")))
        return [self._record(self.run_dir(x["run_id"]), x) for x in out]

    # -- promotion ---------------------------------------------------------------------
    def promote(self, run_id: str, *, reason: str, by: str | None = None) -> tuple[dict, str]:
        """Mark a terminal run as accepted evidence. Returns (record, outcome) with outcome
        ``promoted`` or ``already_promoted``. Plugins may veto (PluginError, nothing changes)
        or add metadata to the promotion entry."""
        return self._set_promotion(run_id, True, reason=reason, by=by)

    def unpromote(self, run_id: str, *, reason: str, by: str | None = None) -> tuple[dict, str]:
        """Reverse a promotion; the history of both stays in the manifest."""
        return self._set_promotion(run_id, False, reason=reason, by=by)

    def _set_promotion(self, run_id: str, promoted: bool, *, reason: str, by: str | None) -> tuple[dict, str]:
        from .errors import InvalidTransition, PluginError

        if not reason or not reason.strip():
            raise InvalidInput("--reason is required and must not be empty")
        record = self.get(run_id)
        if not record["terminal"]:
            raise InvalidTransition(f"run {run_id} is {record['status']}; only a finished run can be promoted", run_id=run_id)
        if record["retention"]["promoted"] == promoted:
            return record, "already_promoted" if promoted else "not_promoted"
        metadata: dict = {}
        if promoted:
            for plugin, res in self.plugins.call("casruns_promote", run=record, reason=reason, by=by):
                if not isinstance(res, dict):
                    continue
                if res.get("veto"):
                    raise PluginError(f"plugin {plugin} vetoed the promotion: {res['veto']}", plugin=plugin, hook="casruns_promote")
                metadata.update(res.get("metadata") or {})
        redactor = self.redactor()
        entry = {
            "action": "promote" if promoted else "unpromote",
            "at": now_ts(),
            "reason": redactor.text(reason),
            "by": redactor.text(by) if by else None,
            "metadata": redactor.metadata(mf.jsonable(metadata)) or None,
        }
        with self.run_dir(run_id).update() as m:
            ret = m.setdefault("retention", {})
            if bool(ret.get("promoted")) == promoted:
                outcome = "already_promoted" if promoted else "not_promoted"
            else:
                ret["promoted"] = promoted
                ret.setdefault("history", []).append(entry)
                m["updated_at"] = entry["at"]
                outcome = "promoted" if promoted else "unpromoted"
        return self.get(run_id), outcome

    def retain(self, run_id: str, *, for_: str | float | None = None, until: str | None = None) -> dict:
        """Override a run's retention: keep it ``for_`` long after it finished, or ``until`` a time."""
        if (for_ is None) == (until is None):
            raise InvalidInput("give exactly one of --for DURATION or --until TIME")
        with self.run_dir(run_id).update() as m:
            ret = m.setdefault("retention", {})
            if for_ is not None:
                ret["retain_for"] = parse_duration(for_)
                ret.pop("retain_until", None)
            else:
                ret["retain_until"] = format_ts(parse_ts(until))
                ret.pop("retain_for", None)
            m["updated_at"] = now_ts()
        return self.get(run_id)

    # -- gc and verify -------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False, wait: bool = False, progress=None) -> dict:
        from .gc import collect_garbage

        return collect_garbage(self, dry_run=dry_run, wait=wait, progress=progress)

    def verify(
        self, run_ids: list[str] | None = None, *, read_data: bool = False, quarantine: bool = False, against: str | None = None, progress=None
    ) -> dict:
        from .verify import verify

        report = verify(self, run_ids, read_data=read_data, quarantine=quarantine, progress=progress)
        if against:
            from .archive import compare

            ids = run_ids or [rid for rid in iter_run_ids(self.runs_dir) if run_stray(self.runs_dir, rid) is None]
            diffs = compare(self, against, sorted(ids), read_data=read_data)
            report["against"] = against
            report["problems"].extend(diffs)
            report["ok"] = report["ok"] and not diffs  # strays found above stay findings
        return report

    # -- archives ------------------------------------------------------------------------
    def archive_push(
        self, dest: str, run_ids: list[str] | None = None, *, promoted: bool = False, progress=None,
        jobs: int | None = None, verify_existing: bool = False,
    ) -> dict:
        from .archive import JOBS, push

        return push(
            self, dest, run_ids, promoted=promoted, progress=progress, jobs=JOBS if jobs is None else jobs,
            verify_existing=verify_existing,
        )

    def archive_pull(self, src: str, run_ids: list[str] | None = None, *, progress=None, jobs: int | None = None) -> dict:
        from .archive import JOBS, pull

        return pull(self, src, run_ids, progress=progress, jobs=JOBS if jobs is None else jobs)

    def archive_list(self, src: str) -> dict:
        from .archive import list_archive

        return list_archive(self, src)

    # -- reaping -----------------------------------------------------------------------
    def reap_lost(self, run: RunDir) -> dict:
        """End an active run whose supervisor is gone: kill leftovers, salvage, mark failed."""
        from . import collect

        with run.locked():
            m = run.read_fresh()
            if m["status"] not in mf.ACTIVE or not self._lost(run, m):
                return m
            proc = m.get("process") or {}
            # Kill what is left of the command: its group, if the leader is provably ours,
            # else each member of that group that started after it (the leader may be gone).
            if locking.process_matches(proc.get("pid"), proc.get("start_time"), proc.get("boot_id")):
                _kill([proc["pgid"]], group=True)
            elif proc.get("pgid") and proc.get("start_time") is not None:
                _kill(locking.group_members(proc["pgid"], proc["start_time"], proc.get("boot_id")), group=False)
        sup = m.get("supervisor") or {}
        deadline = m.get("deadline_at")
        if deadline and time.time() >= parse_ts(deadline):
            status, error = mf.TIMED_OUT, {"code": "timeout", "message": "the run exceeded its timeout and its supervisor is gone"}
        else:
            status = mf.FAILED
            error = {
                "code": "supervisor_lost",
                "message": f"the supervisor (pid {sup.get('pid', '?')} on {sup.get('host', '?')}) is gone; "
                "output captured until then was salvaged",
            }
        try:
            # a salvage still passes artifacts and their names through today's detectors
            return collect.finish(
                run, self.store, status, error=error, artifacts=not _declared_secrets(m),
                redactor=self.redactor(), policy=self.config.artifact_policy,
            )
        except Exception as e:
            if not fsutil.is_no_space(e):
                raise
        # the disk is full: commit the end now, store the spooled output later (reap)
        return collect.finish_deferred(run, status, error=error)

    def reap(self) -> dict:
        """Find every run whose supervisor is gone: end active ones, restart queued ones."""
        report = {
            "schema": "casruns/reap/v1", "reaped": [], "restarted": [], "failed": [], "queue_repaired": 0, "cleaned": 0,
            "collected": [], "pending": [],
        }
        if not self._check_format():
            return report
        report["cleaned"] = self._clean_leftovers()
        queued_entries = set(scheduler.queued_run_ids(self.root))
        for rid in iter_run_ids(self.runs_dir):
            run = self.run_dir(rid)
            try:
                m = run.read_fresh()
            except Exception:
                continue
            status = m["status"]
            if status in mf.TERMINAL and m.get("collection_pending"):
                # a run that ended on a full disk: store its spooled output now, if there is room
                from . import collect

                try:
                    done = collect.complete_pending(
                        run, self.store, artifacts=not _declared_secrets(m), redactor=self.redactor(), policy=self.config.artifact_policy,
                    )
                    if done is not None:
                        report["collected"].append(rid)
                except Exception as e:
                    if not fsutil.is_no_space(e):
                        raise
                    report["pending"].append(rid)  # still full: the workspace stays for the next reap
                continue
            if status in mf.TERMINAL:
                if os.path.lexists(run.spool_dir) or os.path.lexists(run.artifacts_dir):
                    run.remove_workspace()  # a crash between the terminal commit and cleanup
                    report["cleaned"] += 1
                if rid in queued_entries:
                    scheduler.dequeue(self.root, rid)
                    report["queue_repaired"] += 1
                continue
            if status in mf.ACTIVE:
                if self._lost(run, m):
                    final = self.reap_lost(run)
                    report["reaped"].append({"run_id": rid, "status": final["status"]})
                continue
            # queued
            if run.is_supervised():
                continue
            if rid not in queued_entries:
                scheduler.enqueue(self.root, rid, int(m.get("created_ns") or 0))
                report["queue_repaired"] += 1
            if self._restart_queued(run, m):
                report["restarted"].append(rid)
            else:
                report["failed"].append(rid)
        return report

    def _clean_leftovers(self, grace: float = 3600.0) -> int:
        """Remove what crashed writers left: half-created run directories (``runs/.new-*``)
        and temp files of atomic writes (``.tmp-*``). Each name carries its writer's pid: an
        entry is removed only when that process is gone and the entry is older than
        ``grace`` (and never less than a minute, whatever gc_grace says)."""
        import shutil

        removed = 0
        cutoff = time.time() - max(grace, 60.0)

        def abandoned(path: str, name: str) -> bool:
            # names end in -<pid>-<random>: .new-<run id>-<pid>-<hex>, .tmp-<name>-<pid>-<hex>
            parts = name.rsplit("-", 2)
            pid = parts[1] if len(parts) == 3 and parts[1].isdigit() else None
            if pid is not None and os.path.exists(f"/proc/{pid}"):
                return False
            try:
                return os.lstat(path).st_mtime < cutoff
            except OSError:
                return False

        for name in os.listdir(self.runs_dir) if os.path.isdir(self.runs_dir) else []:
            path = os.path.join(self.runs_dir, name)
            if name.startswith((".new-", ".tmp-")):
                if abandoned(path, name):
                    try:
                        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                        removed += 1
                    except OSError:
                        pass
            elif os.path.isdir(path) and not os.path.islink(path):
                try:
                    inner_names = os.listdir(path)
                except OSError:
                    continue  # renamed away (gc's trash) or removed while we looked
                for inner in inner_names:
                    ipath = os.path.join(path, inner)
                    if inner.startswith(".tmp-") and abandoned(ipath, inner):
                        try:
                            os.unlink(ipath)
                            removed += 1
                        except OSError:
                            pass
        return removed

    def _restart_queued(self, run: RunDir, m: dict) -> bool:
        """Start a new supervisor for a queued run that never ran. Secret values were held
        only in the lost supervisor's memory, so a run that needs them ends failed."""
        from . import supervisor

        lock = locking.FileLock(run.supervisor_lock_path, record=True)
        if not lock.acquire(blocking=False, timeout=0.2):  # a probe holds it shared for an instant
            return True  # someone else restarted it
        try:
            req = m.get("request") or {}
            if req.get("secret_env") or req.get("argv_redacted") or req.get("argv_lossy") or req.get("env_redacted"):
                with run.update() as mm:
                    if mm["status"] == mf.QUEUED:
                        mm["error"] = {
                            "code": "supervisor_lost",
                            "message": "the queued run's supervisor is gone and its secret values were held only in memory; replay it",
                        }
                        mf.transition(mm, mf.FAILED, now_ts())
                scheduler.dequeue(self.root, run.run_id)
                return False
            try:
                doc = json.loads(fsutil.read_regular(run.file("env.json"), 16 << 20))
                env, umask = doc["env"], int(doc.get("umask", 0o077))  # casruns 0.2 wrote no umask: private
            except (OSError, ValueError, KeyError, TypeError, CasrunsError):
                # never run it with an environment other than the one it was submitted with
                with run.update() as mm:
                    if mm["status"] == mf.QUEUED:
                        mm["error"] = {"code": "supervisor_lost", "message": "the queued run's supervisor is gone and its environment record is missing; replay it"}
                        mf.transition(mm, mf.FAILED, now_ts())
                scheduler.dequeue(self.root, run.run_id)
                return False
            with run.update() as mm:
                if mm["status"] != mf.QUEUED:
                    return True  # it started or ended meanwhile
                restarts = int(mm.get("restarts") or 0)
                if restarts >= MAX_RESTARTS:
                    # its supervisors keep dying before it starts: restarting again would loop forever
                    mm["error"] = {
                        "code": "restart_limit",
                        "message": f"the queued run's supervisor died {restarts + 1} times before starting it; "
                        "not restarted again (see runs/<id>/supervisor.log); replay it",
                    }
                    mf.transition(mm, mf.FAILED, now_ts())
                else:
                    mm["restarts"] = restarts + 1
            if mm["status"] == mf.FAILED:
                scheduler.dequeue(self.root, run.run_id)
                return False
            supervisor.spawn(self.root, run.run_id, {"env": env, "secret_env": {}, "umask": umask}, lock.fd, by="reap")
            return True
        finally:
            lock.release()

    # -- logs and artifacts ------------------------------------------------------------
    def log_chunks(self, run_id: str, stream: str = "stdout", *, follow: bool = False) -> Iterator[bytes]:
        """The bytes of one log stream; with ``follow``, keeps yielding until the run ends."""
        if stream not in LOG_STREAMS:
            raise InvalidInput(f"unknown stream {stream!r}; one of: {', '.join(LOG_STREAMS)}")
        run = self.run_dir(run_id)
        m = self.manifest(run_id)
        offset = 0
        fd = None
        try:
            while True:
                if m["status"] in mf.TERMINAL:
                    if fd is not None:  # drain the spool we hold open, even if it was unlinked
                        while True:
                            data = os.read(fd, 1 << 20)
                            if not data:
                                return
                            yield data
                    ref = (m.get("logs") or {}).get(stream)
                    if ref:
                        yield from _skip(self.store.iter_chunks(ref["blake3"]), offset)
                    elif m.get("collection_pending"):
                        yield from _skip(_read_spool(run.spool(stream)), offset)  # ended on a full disk
                    return
                if fd is None:
                    try:
                        fd = os.open(run.spool(stream), os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        fd = None
                if fd is not None:
                    while True:
                        data = os.read(fd, 1 << 20)
                        if not data:
                            break
                        offset += len(data)
                        yield data
                if not follow:
                    return
                time.sleep(FOLLOW_POLL)
                m = self.get(run_id)  # reaps a lost run, so follow always ends
                m = self.run_dir(run_id).read() if m["terminal"] else {"status": m["status"]}
        finally:
            if fd is not None:
                os.close(fd)

    def tree(self, run_id: str) -> "Tree":
        from .tree import Tree

        m = self.manifest(run_id)
        ref = (m.get("artifacts") or {}).get("tree")
        if not ref:
            return Tree()
        return Tree.load(self.store, ref)

    def cat(self, run_id: str, path: str) -> Iterator[bytes]:
        entry = self.tree(run_id).get(path)
        if entry is None or entry.type != "file":
            raise ArtifactNotFound(f"run {run_id} has no artifact file {path!r}", run_id=run_id, path=path)
        assert entry.blake3 is not None
        return self.store.iter_chunks(entry.blake3)

    def export(self, run_id: str, dest: str, progress=None) -> dict:
        """Materialize artifacts under ``DEST/artifacts``, logs under ``DEST/logs`` and the record
        as ``DEST/run.json``.

        DEST may exist (a real directory, never a symlink or a file), but none of the three
        entries may: they are built in a fresh directory inside DEST and renamed into place, so
        nothing already standing there (a symlink planted as ``DEST/logs``, say) is followed.
        """
        import shutil
        import stat as stat_mod
        import tempfile

        from .errors import UnsafePath
        from .tree import materialize

        record = self.get(run_id)
        m = self.manifest(run_id)
        if not m["status"] in mf.TERMINAL:
            raise InvalidInput(f"run {run_id} is {m['status']}; export needs a finished run (try wait first)")
        dest = os.path.abspath(dest)
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            os.makedirs(dest)
        else:
            if not stat_mod.S_ISDIR(st.st_mode):
                raise UnsafePath(f"export destination {dest} exists and is not a directory (a symlink or a file); refusing to write through it", path=dest)
        entries = ("artifacts", "logs", "run.json")
        for name in entries:
            if os.path.lexists(os.path.join(dest, name)):
                raise InvalidInput(f"{os.path.join(dest, name)} already exists; export into an empty or new directory", path=dest)
        staging = tempfile.mkdtemp(prefix=".casruns-export-", dir=dest)
        try:
            report = materialize(self.tree(run_id), self.store, os.path.join(staging, "artifacts"), progress=progress)
            logs_dir = os.path.join(staging, "logs")
            os.mkdir(logs_dir, 0o755)
            for stream, ref in (m.get("logs") or {}).items():
                if stream in LOG_STREAMS and ref:
                    self.store.copy_to(ref["blake3"], os.path.join(logs_dir, f"{stream}.log"), mode=0o644)
            fsutil.atomic_write(os.path.join(staging, "run.json"), json.dumps(record, indent=2).encode() + b"\n", mode=0o644)
            for name in entries:
                # rename never follows a symlink at the target; a directory planted there since
                # the check above makes it fail (ENOTEMPTY/EISDIR) instead of writing into it
                os.rename(os.path.join(staging, name), os.path.join(dest, name))
            os.chmod(os.path.join(dest, "artifacts"), 0o755)
            os.chmod(logs_dir.replace(staging, dest), 0o755)
        except OSError as e:
            raise RegistryError(f"cannot export to {dest}: {e.strerror}", path=dest) from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"schema": "casruns/export/v1", "run_id": run_id, "dest": dest, **report}


def _read_spool(path: str) -> Iterator[bytes]:
    try:
        fd = fsutil.open_regular(path)
    except FileNotFoundError:
        return
    try:
        while data := os.read(fd, 1 << 20):
            yield data
    finally:
        os.close(fd)


def _declared_secrets(m: dict) -> bool:
    """True if the run had secret values a salvage cannot rescan its artifacts for."""
    return bool((m.get("request") or {}).get("secret_env")) or bool((m.get("redaction") or {}).get("plugin_values"))


def _kill(ids: list[int], *, group: bool) -> None:
    import signal

    for i in ids:
        try:
            (os.killpg if group else os.kill)(i, signal.SIGKILL)
        except OSError:
            pass


def _fingerprint(salt: str, canon: str) -> str:
    import hashlib

    return hashlib.sha256((salt + canon).encode()).hexdigest()


def _skip(chunks: Iterator[bytes], offset: int) -> Iterator[bytes]:
    for chunk in chunks:
        if offset >= len(chunk):
            offset -= len(chunk)
            continue
        yield chunk[offset:]
        offset = 0


def _create(runs_dir: str, m: dict, env_file: bytes):
    from .runs import create

    fsutil.ensure_dir(runs_dir)
    return create(runs_dir, m, files={"env.json": env_file})


def _base_env_names() -> tuple[str, ...]:
    from .supervisor import BASE_ENV

    return BASE_ENV


def _check_env_name(name: str) -> None:
    if not name or not (name[0].isalpha() or name[0] == "_") or not all(c.isalnum() or c == "_" for c in name):
        raise InvalidInput(f"invalid environment variable name {name!r}")


def _check_label(key: str, value: str) -> None:
    if not key or len(key) > 128 or not all(c.isalnum() or c in "._-/" for c in key):
        raise InvalidInput(f"invalid label key {key!r}: use letters, digits and . _ - /")
    if not isinstance(value, str) or len(value) > 1024 or "\n" in value:
        raise InvalidInput(f"invalid label value for {key!r}: at most 1024 characters, one line")


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"invalid label {item!r}: expected KEY=VALUE")
        _check_label(key, value)
        out[key] = value
    return out
