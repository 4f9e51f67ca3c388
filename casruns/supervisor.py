"""The supervisor: the detached process that drives one run from queued to terminal.

Started by ``submit`` (or by ``reap`` for a queued run whose supervisor died) as
``python -m casruns.supervisor ROOT RUN_ID``, in its own session with no controlling
terminal and no inherited stdio; it survives the submitter's exit and SIGHUP. It receives
the command's environment (including secret values) as JSON on stdin, so values never sit
in the manifest.

Phases (the manifest's status): queued (wait for a slot) -> booting (provider boot) ->
running (the command) -> collecting_artifacts (logs and artifacts into the store) ->
succeeded | failed | timed_out | cancelled.

Crash reasoning. The supervisor holds ``supervisor.lock`` for its whole life (inherited
from the submitter, so held since before the run was visible). If it dies, the kernel
releases that lock and any reader that finds an active run with a free lock knows the
supervisor is gone (robust to pid reuse and reboots) and reaps it: it kills what is left of
the command's process group, salvages the spooled logs and artifacts, and ends the run
``failed`` with ``error.code = "supervisor_lost"`` (``timed_out`` past its deadline).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from . import collect, faults, fsutil, locking, proctree, scheduler
from . import capture
from .hookcalls import _Notifier, _excluded_paths
from .capture import NO_SPACE, _killpg
from .handover import LOCK_FD_ENV, PayloadIncomplete, read_payload
from . import manifest as mf
from .errors import CasrunsError
from .redaction import Redactor, split_secrets
from .redaction import policy as redaction_policy
from .timefmt import format_ts, now_ts

POLL = 0.2
# Space the supervisor holds from its start so that it can always record its own end on a
# full disk: freed when a write fails with ENOSPC, then the terminal commit uses it.
RESERVE_BYTES = 1 << 20



class Supervisor:
    def __init__(self, root: str, run_id: str, payload: dict | None, payload_error: str | None = None) -> None:
        # Built from the layers below, not from the Registry facade above us.
        from .config import Config
        from .runs import RunDir

        self.root = os.path.abspath(root)
        self.run = RunDir(os.path.join(self.root, "runs"), run_id)
        self.start_error: str | None = None  # why this run cannot start (ends it failed, never a crash loop)
        try:
            self.config = Config.load(self.root)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, the run must end, not crash
            # the config became invalid after submit: defaults keep us alive long enough to say so
            self.config = Config({})
            self.start_error = f"the registry config is invalid: {getattr(e, 'message', None) or f'{type(e).__name__}: {e}'}"
        self._store = None
        self.payload = payload or {}
        self.payload_error = payload_error if payload is None else None
        self.secret_env: dict[str, str] = dict(self.payload.get("secret_env") or {})
        # what redaction masks: too short or too common values are recorded as ignored at submit
        self.secrets = split_secrets(self.secret_env)[0]
        self.stop_reason: str | None = None
        self.plugins = None
        self.ctx = None
        self.child: subprocess.Popen | None = None
        self.boot_abandoned = False
        self.redactor = Redactor(self.secrets)
        self.slot: locking.FileLock | None = None
        self.lock_fd: int | None = None
        self._last_beat = 0.0
        self.started_mono: float | None = None  # monotonic time of the commit to booting
        self.deadline: float | None = None  # monotonic
        self.spare: dict[int, int] = {}  # descendants that existed before the command (provider's)
        self.strays_killed: int | None = None  # None until the command was started
        self.no_space = False  # a write found the disk full: the command is stopped, the run fails
        self.notifier: _Notifier | None = None

    @property
    def store(self):
        if self._store is None:
            from .config import packs_allowed
            from .store import DiskStore

            self._store = DiskStore(os.path.join(self.root, "blobs"), packing=packs_allowed(self.root))
        return self._store

    # -- small helpers -------------------------------------------------------------
    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= self.config.heartbeat_interval:
            fsutil.touch(self.run.heartbeat_path)
            self._last_beat = now

    def cancel_requested(self) -> bool:
        return self.stop_reason is not None or os.path.exists(self.run.cancel_path)

    def _on_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_reason = f"supervisor received {signal.Signals(signum).name}"

    def take_lock(self) -> bool:
        fd = os.environ.get(LOCK_FD_ENV)
        if fd is not None:
            self.lock_fd = int(fd)
            os.set_inheritable(self.lock_fd, False)  # the command must not keep it alive
            locking.write_record(self.lock_fd)  # the record names us, not the submitter
            return True
        lock = locking.FileLock(self.run.supervisor_lock_path, record=True)
        # a short wait: a reader probing the lock holds it shared for an instant
        if not lock.acquire(blocking=False, timeout=0.2):
            return False  # another supervisor is alive: it owns this run
        self.lock_fd = lock.fd
        return True

    # -- phases ------------------------------------------------------------------------
    def main(self) -> int:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # SIGUSR1 is what cancel sends; the loops poll the cancel marker every POLL seconds,
        # so the handler only has to exist (the default action would kill us).
        signal.signal(signal.SIGUSR1, lambda *a: None)
        if not self.take_lock():
            return 0
        m = self.run.read_fresh()
        if m["status"] != mf.QUEUED:
            return 0
        if self.payload_error is not None:
            return self.fail_queued(
                "payload_incomplete",
                f"the supervisor never received the run's complete payload ({self.payload_error}); "
                "the submitter or reaper died while handing it over, so the command was not run; replay it",
            )
        if self.start_error is not None:
            return self.fail_queued("start_failed", f"{self.start_error}; the command was not run")
        try:
            # Orphaned descendants of the command are re-parented to us, so none escapes the end.
            proctree.become_subreaper()
            faults.point("supervisor_start")
            if not self.take_reserve():
                # A run started without room to record its end could be left active with no
                # supervisor until space returns: refuse to start it instead.
                return self.fail_queued(
                    "no_space", "the filesystem holding the registry has less than 1 MiB free; the command was not run"
                )
            with self.run.update() as m:
                m["supervisor"] = {
                    "host": locking.hostname(),
                    "pid": os.getpid(),
                    "start_time": locking.process_start_time(os.getpid()),
                    "boot_id": locking.boot_id(),
                }
            self.beat(force=True)
            # The heartbeat has its own thread, so it keeps beating through long boots and long
            # collections, not only while the capture loop spins.
            threading.Thread(target=self._heartbeat_loop, daemon=True, name="casruns-heartbeat").start()
            if not self.wait_for_slot():
                return 0
            return self.drive()
        except Exception as e:  # the run must end, whatever broke: a crash would be restarted into the same crash
            msg = self.redactor.text(f"{type(e).__name__}: {e}")
            print(f"casruns supervisor: {msg}", file=sys.stderr)
            try:
                queued = self.run.read_fresh()["status"] == mf.QUEUED
            except Exception:
                queued = False
            if queued:
                try:
                    return self.fail_queued("start_failed", f"the supervisor could not start the run: {msg}")
                except Exception as e2:
                    print(f"casruns supervisor: cannot fail the run: {e2}", file=sys.stderr)
                    return 1
            if fsutil.is_no_space(e):
                self.no_space = True
                self.release_reserve()
            if self.child is not None:  # never leave the command running behind a failed run
                _killpg(self.child.pid, signal.SIGKILL)
                try:
                    self.child.wait()
                    proctree.end_descendants(0.0, spare=self.spare)
                except Exception:
                    pass
            error = self.no_space_error() if self.no_space else {"code": "supervisor_error", "message": msg}
            try:
                self.finish(mf.FAILED, error=error)
            except Exception as e2:
                print(f"casruns supervisor: cannot finish run: {e2}", file=sys.stderr)
            return 1
        finally:
            if self.slot is not None:
                self.slot.release()
            if self.notifier is not None:
                self.notifier.close(self.config.hook_timeout)

    @property
    def reserve_path(self) -> str:
        return os.path.join(self.run.spool_dir, ".reserve")  # removed with the workspace

    def take_reserve(self) -> bool:
        """Allocate the reserve; False if the disk cannot spare it (the run must not start)."""
        try:
            fd = fsutil.open_private(self.reserve_path, os.O_WRONLY | os.O_CREAT)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            return True
        except (OSError, CasrunsError) as e:
            print(f"casruns supervisor: cannot reserve {RESERVE_BYTES} bytes: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            self.release_reserve()  # whatever part of it was allocated
            # Only a full disk stops the run; a filesystem that cannot preallocate (or refuses
            # the file for another reason) runs it without a reserve, as casruns 0.2 did.
            return not fsutil.is_no_space(e)

    def release_reserve(self) -> bool:
        """Free the reserve for the writes that record the run's end. True if it was there."""
        try:
            os.unlink(self.reserve_path)
            return True
        except OSError:
            return False

    def with_space(self, fn):
        """Call ``fn``; if it finds the disk full, free the reserve and call it once more."""
        try:
            return fn()
        except Exception as e:
            if not fsutil.is_no_space(e):
                raise
            self.no_space = True
            if not self.release_reserve():
                raise
            return fn()

    def no_space_error(self) -> dict:
        return {
            "code": "no_space",
            "message": "the filesystem holding the registry is full: the command was stopped and output "
            "captured until then was kept",
        }

    def fail_queued(self, code: str, message: str) -> int:
        """End a queued run that must not start: an incomplete payload (the command would get
        another environment, argv or umask than the one submitted), an invalid config, an
        error before booting. Never a crash: ``reap`` would restart it into the same crash."""
        message = self.redactor.text(message)
        print(f"casruns supervisor: {message}", file=sys.stderr)
        with self.run.update() as mm:
            if mm["status"] == mf.QUEUED:
                mm["error"] = {"code": code, "message": message}
                mf.transition(mm, mf.FAILED, now_ts())
        scheduler.dequeue(self.root, self.run.run_id)
        self.run.remove_workspace()
        return 1

    def _heartbeat_loop(self) -> None:
        while True:
            time.sleep(self.config.heartbeat_interval)
            try:
                self.beat(force=True)
            except OSError:
                pass  # the run directory went away (gc of a finished run): nothing to beat for

    def wait_for_slot(self) -> bool:
        m = self.run.read_fresh()
        created_ns = int(m.get("created_ns", 0)) or time.time_ns()
        qname = scheduler.entry_name(created_ns, self.run.run_id)
        if not os.path.exists(os.path.join(self.root, "queue", qname)):
            scheduler.enqueue(self.root, self.run.run_id, created_ns)
        while True:
            if self.cancel_requested():
                m = self.run.read_fresh()
                if m["status"] in mf.TERMINAL:
                    scheduler.dequeue(self.root, self.run.run_id)
                    return False
                if self.stop_reason:  # SIGTERM while queued: the run ends cancelled, never started
                    with self.run.update() as mm:
                        if mm["status"] == mf.QUEUED:
                            mm["cancel"] = {"requested_at": now_ts(), "reason": self.stop_reason}
                            mm["error"] = {"code": "cancelled", "message": self.stop_reason}
                            mf.transition(mm, mf.CANCELLED, now_ts())
                    scheduler.dequeue(self.root, self.run.run_id)
                    return False
            self.slot = scheduler.try_claim_slot(self.root, self.run.run_id, self.config.max_running)
            if self.slot is not None:
                break
            self.beat()
            time.sleep(POLL * (0.75 + random.random() / 2))
        scheduler.dequeue(self.root, self.run.run_id)
        with self.run.update() as m:
            if m["status"] != mf.QUEUED:  # cancelled while we claimed the slot
                return False
            now = time.time()
            mf.transition(m, mf.BOOTING, format_ts(now))
            timeout = (m.get("request") or {}).get("timeout")
            if timeout:
                m["deadline_at"] = format_ts(now + float(timeout))  # recorded for people: wall clock
            # Durations run on the monotonic clock: a wall clock set back or forward while the
            # run is active must neither stretch nor cut its timeout (spec/format.md, "Clocks").
            self.started_mono = time.monotonic()
            self.deadline = self.started_mono + float(timeout) if timeout else None
        try:
            os.unlink(self.run.file("env.json"))
        except OSError:
            pass
        return True

    def transition(self, new: str, **fields) -> dict:
        """Commit a status change under the run lock, then tell the plugins (outside the lock)."""
        with self.run.update() as m:
            old = m["status"]
            if old in mf.TERMINAL:
                return m
            if old != new:
                mf.transition(m, new, now_ts())
            m.update({k: v for k, v in fields.items() if v is not None})
            snapshot = json.loads(json.dumps(m))
        if old != new:
            self.notify(old, new, snapshot)
        return snapshot

    def notify(self, old: str | None, new: str, m: dict) -> None:
        """Tell ``casruns_status_changed`` implementations, in order, on a thread of their own:
        a hook that blocks delays no timeout, cancel or collection (spec/plugins.md)."""
        if self.plugins is None:
            return
        if self.notifier is None:
            self.notifier = _Notifier(self)
        self.notifier.put(old, new, m)

    def hook_limit(self) -> float:
        """When a hook called before the command ends must have returned: the run's deadline or
        ``hook_timeout`` from now, whichever comes first (monotonic)."""
        limit = time.monotonic() + self.config.hook_timeout
        return limit if self.deadline is None else min(limit, self.deadline)

    def hook_timed_out(self, hook: str) -> dict:
        return {"code": "plugin_error", "message": f"{hook} did not return within {self.config.hook_timeout:g}s; abandoned", "hook": hook}

    def bounded(self, fn, deadline: float | None):
        """Run ``fn`` in a thread; stop waiting at the deadline (monotonic) or on a cancel
        requested while it runs (a cancel that ended the run before the call does not cut short
        the hooks that end it, such as teardown).

        Returns ("ok", result) | ("error", exc) | ("timeout", None) | ("cancelled", None).
        A hook that hangs is abandoned (its thread is a daemon and dies with us).
        """
        box: dict = {}
        cancelled_before = self.cancel_requested()

        def target():
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                box["error"] = e

        t = threading.Thread(target=target, daemon=True, name="casruns-hook")
        t.start()
        while t.is_alive():
            t.join(POLL)
            self.beat()
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout", None
            if not cancelled_before and self.cancel_requested():
                return "cancelled", None
        if "error" in box:
            return "error", box["error"]
        return "ok", box.get("result")

    def fallback_redactor(self):
        """When plugins could not contribute: the declared values and the config's detectors."""
        return redaction_policy(self.config.raw.get("redaction"), self.secrets)

    def plugin_error(self, e: BaseException) -> dict:
        details = getattr(e, "details", {}) or {}
        err = {"code": "plugin_error", "message": self.redactor.text(str(getattr(e, "message", e)))}
        for k in ("plugin", "hook"):
            if details.get(k):
                err[k] = details[k]
        return err

    def drive(self) -> int:
        from . import plugins as plugins_mod
        from .errors import PluginError
        from .hookspecs import RunContext

        m = self.run.read_fresh()
        req = m.get("request") or {}
        argv = list(self.payload.get("argv") or req.get("argv") or [])
        env = dict(self.payload.get("env") or {})
        env.update(self.secret_env)
        env["CASRUNS_RUN_ID"] = self.run.run_id
        env["CASRUNS_ARTIFACTS_DIR"] = self.run.artifacts_dir
        self.ctx = RunContext(
            run_id=self.run.run_id,
            provider=m.get("provider", "shell"),
            argv=argv,
            env=env,
            cwd=self.payload.get("cwd") or req.get("cwd") or "/",  # the real one when stored redacted
            labels=dict(m.get("labels") or {}),
            artifacts_dir=self.run.artifacts_dir,
            registry_root=self.root,
            attempt=int(m.get("attempt", 1)),
            resumed_from=m.get("resumed_from"),
            manifest=json.loads(json.dumps(m)),
        )
        # plugins and redaction: a plugin that cannot load fails the run before anything runs
        try:
            self.plugins = plugins_mod.load([*req.get("plugins", []), *self.config.plugins])
        except PluginError as e:
            self.redactor = self.fallback_redactor()
            return self.end(mf.FAILED, error=self.plugin_error(e), teardown=False)
        state, contribs = self.bounded(lambda: self.plugins.call("casruns_redaction", run=self.ctx), self.hook_limit())
        if state != "ok":
            self.redactor = self.fallback_redactor()
            if state == "cancelled":
                return self.end(mf.CANCELLED, teardown=False)
            if state == "timeout" and self.deadline is not None and time.monotonic() >= self.deadline:
                return self.end(mf.TIMED_OUT, error={"code": "timeout", "message": "the run exceeded its timeout in casruns_redaction"}, teardown=False)
            error = self.hook_timed_out("casruns_redaction") if state == "timeout" else self.plugin_error(contribs)
            return self.end(mf.FAILED, error=error, teardown=False)
        try:
            values = dict(self.secrets)
            patterns: dict = {}
            plugin_values = False
            for plugin, contrib in contribs:
                if not isinstance(contrib, dict):
                    raise PluginError(f"plugin {plugin}: casruns_redaction must return a dict", plugin=plugin, hook="casruns_redaction")
                contributed = split_secrets(contrib.get("values") or {})[0]
                plugin_values = plugin_values or bool(contributed)
                values.update(contributed)
                patterns.update(contrib.get("patterns") or {})
            if plugin_values:
                # a reaper salvaging this run must know there were secrets it cannot rescan for
                with self.run.update() as mm:
                    mm.setdefault("redaction", {})["plugin_values"] = True
            self.redactor = redaction_policy(self.config.raw.get("redaction"), values, patterns)
        except PluginError as e:
            self.redactor = self.fallback_redactor()
            return self.end(mf.FAILED, error=self.plugin_error(e), teardown=False)
        self.notify(mf.QUEUED, mf.BOOTING, self.ctx.manifest)
        # boot, bounded by the run's timeout
        deadline = self.deadline
        if self.cancel_requested():
            return self.end(mf.CANCELLED, teardown=False)
        state, result = self.bounded(lambda: self.plugins.call("casruns_boot", run=self.ctx), deadline)
        if state in ("timeout", "cancelled"):
            self.boot_abandoned = True  # teardown is told: boot may still be creating things
        if state == "timeout":
            return self.end(mf.TIMED_OUT, error={"code": "timeout", "message": "the run exceeded its timeout while booting"})
        if state == "cancelled":
            return self.end(mf.CANCELLED)
        if state == "error":
            return self.end(mf.FAILED, error=self.plugin_error(result))
        runtime: dict = {}
        preview: dict = {}
        for _, res in result:
            if isinstance(res, dict):
                runtime.update(res.get("runtime") or {})
                preview.update(res.get("preview") or {})
        # normalised first: a datetime or NaN from a plugin must not make every later JSON output fail
        meta = {"runtime": self.redactor.metadata(mf.jsonable(runtime)), "preview": self.redactor.metadata(mf.jsonable(preview))}
        with self.run.update() as mm:
            mm.update({k: v for k, v in meta.items() if v})
        argv = [str(a) for a in self.ctx.argv]
        # what boot left running belongs to the provider (a preview server, say): its teardown
        # ends it; everything else that descends from us after this point is the command's
        self.spare = proctree.descendants()
        self.strays_killed = 0
        try:
            child = self.child = subprocess.Popen(
                argv,
                umask=int(self.payload.get("umask", 0o077)),  # the submitter's, not ours (private if unknown)
                cwd=self.ctx.cwd,
                env={str(k): str(v) for k, v in self.ctx.env.items()},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            message = self.redactor.text(f"cannot start {argv[0] if argv else '(empty)'}: {e.strerror}")
            return self.end(mf.FAILED, error={"code": "spawn_failed", "message": message})
        self.transition(
            mf.RUNNING,
            process={
                "pid": child.pid,
                "pgid": child.pid,
                "start_time": locking.process_start_time(child.pid),
                "boot_id": locking.boot_id(),
            },
        )
        outcome, _ = self.capture(child)
        returncode = child.returncode
        exit_code = returncode if returncode is not None and returncode >= 0 else None
        sig = -returncode if returncode is not None and returncode < 0 else None
        if outcome == NO_SPACE:
            return self.end(mf.FAILED, exit_code=exit_code, signal=sig, error=self.no_space_error())
        if outcome == mf.TIMED_OUT:
            return self.end(mf.TIMED_OUT, exit_code=exit_code, signal=sig, error={"code": "timeout", "message": "the run exceeded its timeout"})
        if outcome == mf.CANCELLED:
            return self.end(mf.CANCELLED, exit_code=exit_code, signal=sig)
        if returncode == 0:
            return self.end(mf.SUCCEEDED, exit_code=0)
        message = f"command exited with code {exit_code}" if exit_code is not None else f"command killed by signal {sig}"
        return self.end(mf.FAILED, exit_code=exit_code, signal=sig, error={"code": "command_failed", "message": message})

    def end(self, status: str, *, teardown: bool = True, **kw) -> int:
        """Teardown (always, if booting began), artifact hooks, collection, terminal commit."""
        from .errors import PluginError

        if self.no_space:
            self.release_reserve()
        m = self.with_space(lambda: self.transition(mf.COLLECTING))
        if status == mf.CANCELLED and not m.get("cancel") and self.stop_reason:
            with self.run.update() as mm:
                mm.setdefault("cancel", {"requested_at": now_ts(), "reason": self.stop_reason})
        extra: dict = {}
        if teardown and self.plugins is not None:
            outcome = {"status": status, "exit_code": kw.get("exit_code"), "boot_abandoned": self.boot_abandoned}
            limit = time.monotonic() + max(self.config.teardown_timeout, 1.0)
            state, result = self.bounded(lambda: self.plugins.call("casruns_teardown", run=self.ctx, outcome=outcome), limit)
            if state == "ok":
                extra["teardown"] = {"ok": True}
            elif state == "error":
                extra["teardown"] = {"ok": False, **self.plugin_error(result)}
            else:
                extra["teardown"] = {"ok": False, "code": "teardown_timeout", "message": f"teardown did not finish within {self.config.teardown_timeout:g}s"}
        exclude: set[str] = set()
        if self.plugins is not None:
            limit = time.monotonic() + self.config.hook_timeout  # the run's deadline is past or moot here
            state, result = self.bounded(
                lambda: self.plugins.call("casruns_collect_artifacts", run=self.ctx, artifacts_dir=self.run.artifacts_dir), limit
            )
            if state == "ok":
                try:
                    exclude = _excluded_paths(result)
                except PluginError as e:
                    status, kw["error"] = mf.FAILED, self.plugin_error(e)
            elif state == "error":
                status, kw["error"] = mf.FAILED, self.plugin_error(result)
            elif state == "timeout":
                status, kw["error"] = mf.FAILED, self.hook_timed_out("casruns_collect_artifacts")
            else:  # cancelled while the hook ran: collect everything now
                status = mf.CANCELLED
        if self.strays_killed is not None:
            # whatever the command's escaped processes started while teardown ran
            group = self.child.pid if self.child is not None else None
            self.strays_killed += proctree.end_descendants(self.config.kill_grace, spare=self.spare, group=group)
            extra["strays_killed"] = self.strays_killed
        if self.started_mono is not None:
            extra["duration_s"] = round(time.monotonic() - self.started_mono, 3)
        faults.point("supervisor_before_collect")
        final = self.finish(status, extra=extra, exclude=exclude, **kw)
        self.notify(mf.COLLECTING, final["status"], final)
        return 0 if final["status"] == mf.SUCCEEDED else 1

    def finish(self, status: str, *, extra: dict | None = None, exclude: set[str] = frozenset(), **kw) -> dict:
        """Collect and commit the terminal status; on a full disk, commit it without collecting.

        Crash windows on a full disk (spec/format.md, "A full disk"): the reserve is freed first,
        so the terminal commit has room even when the logs do not; the spooled output then stays
        in the workspace (``collection_pending``) for ``reap`` to store once there is space.
        """
        try:
            faults.point("supervisor_collect")
            return self.with_space(
                lambda: collect.finish(
                    self.run, self.store, status, extra=extra, exclude=exclude, redactor=self.redactor,
                    policy=self.config.artifact_policy, **kw,
                )
            )
        except Exception as e:
            # Whatever stopped the collection (a full disk, a stray where a blob or blobs/tmp
            # belongs, an I/O error), the run still ends: the output stays in the workspace
            # (collection_pending) for reap to store, and the record says why.
            if fsutil.is_no_space(e):
                self.no_space = True
                error = self.no_space_error()
            else:
                message = self.redactor.text(f"cannot store the run's output: {type(e).__name__}: {getattr(e, 'message', e)}")
                error = {"code": "collect_failed", "message": message + "; it stays in the run's workspace until casruns reap stores it"}
            self.release_reserve()
            print(f"casruns supervisor: {error['message']}", file=sys.stderr)
            return collect.finish_deferred(
                self.run, mf.FAILED, exit_code=kw.get("exit_code"), signal=kw.get("signal"), error=error, extra=extra,
            )

    # -- the capture loop --------------------------------------------------------------
    def capture(self, child: subprocess.Popen) -> tuple[str | None, str | None]:
        """Pump the child's output into the spool until it ends (casruns/capture.py)."""
        return capture.pump(self, child)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m casruns.supervisor ROOT RUN_ID", file=sys.stderr)
        return 2
    os.umask(0o077)
    payload, error = None, None
    try:
        payload = read_payload(sys.stdin.fileno())
    except (PayloadIncomplete, OSError) as e:
        error = str(e)
    return Supervisor(args[0], args[1], payload, error).main()


if __name__ == "__main__":
    sys.exit(main())
