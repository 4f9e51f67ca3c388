"""Hook specifications: the plugin author's reference.

A plugin is a module (or object) with functions named like the specs below, decorated with
``casruns.hookimpl``. It is found through the ``casruns`` entry-point group, the registry
config's ``plugins`` list, ``--plugin MODULE`` or ``CASRUNS_PLUGINS`` (see spec/plugins.md).
A hook implementation may accept any subset of the arguments a spec lists.

Two processes call hooks:

* the **supervisor** (the detached process that drives one run) calls the run hooks, in
  the run phase each docstring names;
* the **CLI** process (or an embedder's process using ``casruns.Registry``) calls the
  registry hooks (providers at submit, promotion, gc roots, resume, archive backends).

Failure isolation: an exception in a run hook ends the run ``failed`` with
``error.code = "plugin_error"`` naming the plugin and hook (teardown still runs); in a CLI
hook it is one error line and exit code 8. ``casruns_status_changed`` exceptions are
recorded in the supervisor log and never affect the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("casruns")


@dataclass
class RunContext:
    """What a run hook sees of a run. ``argv``, ``env`` and ``cwd`` may be changed in boot.

    It lives here, next to the hooks that receive it, so the spec module is the whole
    reference; ``casruns.plugins.RunContext`` is the same class.
    """

    run_id: str
    provider: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    labels: dict[str, str]
    artifacts_dir: str
    registry_root: str
    attempt: int = 1
    resumed_from: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)  # a copy: changing it changes nothing


@hookspec
def casruns_providers() -> list[str] | None:
    """Name the providers this plugin implements.

    Called by the CLI at submit to validate ``--provider``, and by ``casruns plugins``.

    :return: a list of provider names (``["wp-codebox"]``), or None.
    """


@hookspec
def casruns_boot(run: RunContext) -> dict[str, Any] | None:
    """Prepare the sandbox before the command runs.

    Called by the supervisor in the ``booting`` phase, for every plugin; an implementation
    acts only when ``run.provider`` is one of its providers. It may change ``run.argv``,
    ``run.env`` and ``run.cwd`` in place. Bounded by the run's timeout: a boot that hangs
    past it ends the run ``timed_out``.

    :param run: the run being started (see :class:`RunContext` above).
    :return: None, or ``{"runtime": {...}, "preview": {...}}``: runtime metadata (a runtime id,
        a version) and preview info (``url``, ``expires_at``), merged into the manifest after
        redaction. Later results override earlier keys.
    """


@hookspec
def casruns_teardown(run: RunContext, outcome: dict[str, Any]) -> None:
    """Tear the sandbox down after the command, always.

    Called by the supervisor after the command ended, whatever happened: success, failure,
    timeout, cancel or a boot that failed. A teardown that raises is recorded in the
    manifest's ``teardown`` table and does not hide the run's own result.

    :param run: the run.
    :param outcome: ``{"status": <the status the run is about to end with>, "exit_code": int | None}``.
    """


@hookspec
def casruns_redaction(run: RunContext) -> dict[str, Any] | None:
    """Contribute secrets to mask in this run's logs, transcript, metadata and artifacts.

    Called by the supervisor once, before the command starts.

    :param run: the run about to start.
    :return: None, or ``{"values": {name: value}, "patterns": {name: regex}}``. Values are
        masked as ``[REDACTED:name]`` wherever they appear; patterns (Python regular
        expressions over one line of text) are masked likewise.
    """


@hookspec
def casruns_collect_artifacts(run: RunContext, artifacts_dir: str) -> list[str] | None:
    """Add or filter artifacts before they are ingested.

    Called by the supervisor in ``collecting_artifacts``, before the artifact directory is
    walked. A plugin may write extra files into ``artifacts_dir``.

    :param run: the run whose command ended.
    :param artifacts_dir: the absolute path of the run's artifact directory (``run.artifacts_dir``).
    :return: None, or relative paths (inside ``artifacts_dir``) to leave out of the artifact tree.
    """


@hookspec
def casruns_status_changed(run_id: str, old: str | None, new: str, manifest: dict[str, Any]) -> None:
    """Notification that a run changed status (for example to tell an orchestrator).

    Called by the supervisor after each transition it commits, outside the run's lock.
    Exceptions are written to the run's ``supervisor.log`` and ignored.

    :param run_id: the run's id.
    :param old: the status before the transition (``queued`` for the first call of a run).
    :param new: the status just committed.
    :param manifest: a copy of the manifest as committed: changing it changes nothing.
    :return: ignored.
    """


@hookspec
def casruns_promote(run: dict[str, Any], reason: str, by: str | None) -> dict[str, Any] | None:
    """Validate or veto a promotion, or add promotion metadata.

    Called by the CLI (``casruns promote``) before the promotion is committed.

    :param run: the run's record (``casruns/run/v1``).
    :param reason: the ``--reason`` given.
    :param by: the ``--by`` given, or None.
    :return: None to accept; ``{"veto": "why"}`` to refuse (nothing changes and the CLI shows
        the reason); ``{"metadata": {...}}`` to add fields to the promotion entry.
    """


@hookspec
def casruns_gc_roots(registry_root: str) -> list[str] | None:
    """Name extra blobs (64-hex addresses) or run ids whose blobs gc must keep.

    Called by the CLI (``casruns gc``, ``casruns gc --dry-run``, ``Registry.gc``) once per gc,
    while it holds ``locks/gc.lock``: after gc finished the run deletions a killed gc left
    (``runs/.trash-*``; a dry run only counts them) and before it removes any run or
    deletes any blob. Not called when
    the registry does not exist yet. A run id named here is not removed by this gc, even if
    retention makes it eligible, and its blobs are kept; a blob address named here is kept
    even if no run references it. A failure stops the gc before it removes anything.

    :param registry_root: the registry's root directory.
    :return: None, or a list of blob addresses and/or run ids.
    """


@hookspec
def casruns_resume(run: dict[str, Any], attempt: int) -> dict[str, Any] | None:
    """Refuse or prepare a resumed attempt of a run.

    Called by the CLI (``casruns resume``) before the new attempt is created.

    :param run: the earlier attempt's record (``casruns/run/v1``).
    :param attempt: the number the new attempt will have.
    :return: None; ``{"refuse": "why"}`` to refuse (nothing is created, the CLI shows why);
        or ``{"env": {...}}`` to give the new attempt extra environment variables (for
        example a snapshot to restore), kept like ``--env`` values: in the supervisor's
        memory, and while the run is queued in its private ``env.json``.
    """


@hookspec
def casruns_archive_backends() -> "dict[str, Any] | None":
    """Add archive backends: URL schemes casruns does not know, and how to open them.

    Called by the CLI (``casruns archive push``, ``pull``, ``list``, ``verify --against``)
    when an archive URL's scheme is not one of the built-in ones (:data:`casruns.backends.BACKENDS`),
    before the archive is opened. A built-in scheme is never replaced; when two plugins name
    the same scheme, the first one called keeps it. A scheme no plugin names goes to fsspec.

    :return: None, or ``{scheme: casruns.backends.Backend(open, extra)}``. casruns calls
        ``open(url, config)`` (``config``: the registry config's ``[archive]`` table), which
        returns a :class:`casruns.archive.Remote`; an exception it raises (other than a
        casruns error such as ``backend_missing``) is a ``plugin_error`` naming the plugin.
    """
