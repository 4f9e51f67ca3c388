"""Replay, resume and chains: a new run from an old run's recipe (its command, labels, env
names and timeout; secrets and env values read again from the caller's environment), a resumed
attempt seeded with the earlier attempt's artifacts, and the attempts of one chain."""

from __future__ import annotations

from collections.abc import Mapping
from . import intake, query
from . import manifest as mf
from .errors import InvalidInput
from .root import RegistryRoot



def recipe(reg: "RegistryRoot", run_id: str) -> tuple[dict, dict]:
    m = query.manifest(reg, run_id)
    req = m.get("request") or {}
    if req.get("argv_redacted"):
        raise InvalidInput(
            f"run {run_id}'s command line held a secret and was stored redacted; it cannot be run again from its record"
        )
    if req.get("cwd_redacted"):
        raise InvalidInput(f"run {run_id}'s working directory held a secret and was stored redacted; it cannot be run again from its record")
    if req.get("argv_lossy"):
        raise InvalidInput(
            f"run {run_id}'s command line held bytes that are not UTF-8 and was stored with them replaced; "
            "it cannot be run again exactly from its record"
        )
    return m, req


def replay(reg: "RegistryRoot", run_id: str, *, run_id_new: str | None = None, environ: Mapping[str, str] | None = None, spawn: bool = True) -> dict:
    """Submit a new run from a run's recipe (secrets and env values read again from
    ``environ``), linked to it by ``replay_of``."""
    m, req = recipe(reg, run_id)
    return _resubmit(reg, m, req, run_id_new=run_id_new, environ=environ, spawn=spawn, chain={"replay_of": run_id})


def resume(reg: "RegistryRoot", run_id: str, *, environ: Mapping[str, str] | None = None, spawn: bool = True) -> dict:
    """Start attempt n+1 of a failed, timed-out or cancelled run, seeded with its artifacts.

    The command sees ``CASRUNS_RESUMED_FROM`` (the earlier run id) and ``CASRUNS_ATTEMPT``.
    A plugin may refuse (``{"refuse": why}``) or prepare it (``{"env": {...}}``)."""
    from .errors import InvalidTransition, PluginError

    m, req = recipe(reg, run_id)
    if m["status"] not in mf.RESUMABLE:
        raise InvalidTransition(
            f"run {run_id} is {m['status']}; only a failed, timed_out or cancelled run can be resumed", run_id=run_id
        )
    attempt = int(m.get("attempt", 1)) + 1
    env = {"CASRUNS_RESUMED_FROM": run_id, "CASRUNS_ATTEMPT": str(attempt)}
    record = query.get(reg, run_id)
    plugins = _plugins_for(reg, req)
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
    return _resubmit(reg, m, req, environ=environ, spawn=spawn, chain=chain)


def _plugins_for(reg: "RegistryRoot", req: dict):
    recorded = [p for p in req.get("plugins") or [] if p not in reg.plugin_modules()]
    if not recorded:
        return reg.plugins
    return RegistryRoot(reg.root, plugins=[*reg.extra_plugins, *recorded]).plugins


def _resubmit(reg: "RegistryRoot", m: dict, req: dict, *, environ, spawn: bool, chain: dict, run_id_new: str | None = None) -> dict:
    recorded = [p for p in req.get("plugins") or [] if p not in reg.plugin_modules()]
    # the plugins the run was submitted with, not only today's config: the same provider
    target = RegistryRoot(reg.root, plugins=[*reg.extra_plugins, *recorded]) if recorded else reg
    return intake.submit(
        target,
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


def chain(reg: "RegistryRoot", run_id: str) -> list[dict]:
    """Every attempt of the run's chain (linked by ``resumed_from``), first attempt first."""
    m = query.manifest(reg, run_id)
    by_id = {x["run_id"]: x for x in reg.iter_manifests()}
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
    return [query.record(reg, reg.run_dir(x["run_id"]), x) for x in out]
