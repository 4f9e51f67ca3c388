"""Intake: the core of ``submit``. Validate a request, record the run as queued (atomically,
with its supervisor lock held), enqueue it and hand the supervisor its payload.

The payload (environment, secret values, umask, the real argv) exists only in memory and in
the framed hand-over (spec/format.md, "The payload hand-over"); what is stored is redacted.
"""

from __future__ import annotations

import json
import os
import time

from collections.abc import Iterable, Mapping
from . import fsutil, locking, scheduler
from . import manifest as mf
from .errors import CasrunsError, InvalidInput, RunIdConflict, UnknownProvider
from .ids import new_run_id, validate_run_id
from .runs import RunExists
from .timefmt import format_ts, now_ts, parse_duration
from . import query

TYPE_CHECKING = False  # typing costs 3 ms on the status path
if TYPE_CHECKING:
    from .root import RegistryRoot



def submit(reg: "RegistryRoot", argv: list[str],
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
        return _submit(reg, 
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
            redactor = reg.redactor(used)
            e.message = redactor.text(e.message)
            e.details = redactor.metadata(e.details)
            e.args = (e.message,)
        raise


def _submit(reg: "RegistryRoot", argv, *, provider, timeout, labels, env, secret_env, cwd, recipe, run_id, retain_for, environ, spawn, _chain) -> dict:
    argv = [str(a) for a in argv]
    if not argv or not argv[0]:
        raise InvalidInput("no command given: put it after --, e.g. casruns submit -- make test")
    providers = reg.plugins.providers()
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
        "plugins": reg.plugin_modules(),
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
        "origin": None,  # set below, once the registry exists: where the run ran
        "labels": labels,
        "request": request,
        "retention": {"promoted": False, "retain_for": retain_s},
    }
    if ignored:
        m["redaction"] = {"ignored_secrets": ignored}
    reg.ensure()
    m["origin"] = {"registry_id": reg.registry_id, "host": locking.hostname()}
    # Redact the request itself: a secret typed into argv or a label never reaches the
    # manifest. The supervisor then gets the real argv in memory only.
    redactor = reg.redactor(used)
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
    # a declared secret in the working directory or the recipe stays off disk too; the
    # supervisor gets the real directory in memory (and a restart by reap cannot)
    request["cwd"] = redactor.text(cwd)
    if request["cwd"] != cwd:
        request["cwd_redacted"] = True
        payload["cwd"] = cwd
    if recipe:
        request["recipe"] = redactor.text(recipe)
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
        run, lock = _create(reg.runs_dir, m, env_file)
    except RunExists:
        existing = reg.run_dir(rid).read()
        old = existing.get("request") or {}
        if old.get("hash") != _fingerprint(old.get("hash_salt", ""), canon):
            raise RunIdConflict(
                f"run id {rid} already names a run submitted with a different request", run_id=rid
            ) from None
        return query.get(reg, rid)
    try:
        seed = (_chain or {}).get("seed_tree")
        if seed:
            # a resumed attempt starts from the earlier attempt's artifacts, materialized
            # from the store (collecting them again later dedups to the same blobs)
            from .tree import Tree, materialize

            materialize(Tree.load(reg.store, seed), reg.store, run.artifacts_dir)
        scheduler.enqueue(reg.root, rid, m["created_ns"])
        if spawn:
            from . import handover

            handover.spawn(reg.root, rid, payload, lock.fd)
    except Exception as e:
        with run.update() as mm:
            mm["error"] = {"code": "spawn_failed", "message": f"cannot start supervisor: {e}"}
            mf.transition(mm, mf.FAILED, now_ts())
        scheduler.dequeue(reg.root, rid)
    finally:
        lock.release()
    return query.get(reg, rid, reap=False)


def _fingerprint(salt: str, canon: str) -> str:
    import hashlib

    return hashlib.sha256((salt + canon).encode()).hexdigest()


def _create(runs_dir: str, m: dict, env_file: bytes):
    from .runs import create

    fsutil.ensure_dir(runs_dir)
    return create(runs_dir, m, files={"env.json": env_file})


def _base_env_names() -> tuple[str, ...]:
    from .handover import BASE_ENV

    return BASE_ENV


def _check_env_name(name: str) -> None:
    if not name or not (name[0].isalpha() or name[0] == "_") or not all(c.isalnum() or c == "_" for c in name):
        raise InvalidInput(f"invalid environment variable name {name!r}")


def _check_label(key: str, value: str, where: str = "a label") -> None:
    # Messages never quote the label: it may hold a declared secret, and this check runs
    # before anything knows which values are secret (the CLI parses labels first).
    if not key or len(key) > 128 or not all(c.isalnum() or c in "._-/" for c in key):
        raise InvalidInput(f"invalid key in {where}: use 1-128 letters, digits and . _ - /")
    if not isinstance(value, str) or len(value) > 1024 or "\n" in value:
        raise InvalidInput(f"invalid value in {where}: at most 1024 characters, one line")


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for n, item in enumerate(items, 1):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"invalid label (--label number {n}): expected KEY=VALUE")
        _check_label(key, value, f"--label number {n}")
        out[key] = value
    return out
