"""The plugin manager: discovery, selection, and calling hooks with failure isolation.

Plugins load lazily: only the paths that need them (submit, run, the supervisor, promote,
resume, gc, ``casruns plugins``, an archive URL whose scheme is not built in) call
:func:`load`; ``status`` and ``list`` never import pluggy.

Sources, in load order:

1. the ``casruns`` entry-point group (built-ins ``shell`` and ``redact`` come this way, as
   third-party plugins do); ``CASRUNS_LOAD_PLUGINS=a,b`` narrows it to those names;
2. modules named by the registry config's ``plugins`` list, ``--plugin MODULE`` and the
   ``CASRUNS_PLUGINS`` variable (comma-separated), which is how a supervisor gets them.

``CASRUNS_TRACE_PLUGINS=1`` prints one line per hook implementation call on stderr (the
supervisor's stderr is ``runs/<id>/supervisor.log``): plugin, hook, duration and outcome
(``returned <type>`` or ``raised <exception type>``), never an argument or a value.

Hooks are called one implementation at a time (in pluggy's order), so a failure names the
plugin and the hook that failed: :meth:`Plugins.call` raises PluginError with both;
:meth:`Plugins.notify` logs and continues.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .hookspecs import RunContext  # noqa: F401 - where plugin authors have imported it from

hookimpl = pluggy.HookimplMarker("casruns")


@dataclass
class PluginInfo:
    name: str
    source: str
    module: str
    hooks: list[str]
    providers: list[str]

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "module": self.module, "hooks": self.hooks, "providers": self.providers}


class Plugins:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("casruns")
        self.pm.add_hookspecs(hookspecs)
        self.sources: dict[str, str] = {}
        self.trace = os.environ.get("CASRUNS_TRACE_PLUGINS", "") not in ("", "0")

    def register(self, plugin: object, name: str, source: str) -> None:
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            return
        self.pm.register(plugin, name=name)
        self.sources[name] = source

    def load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        only = {n.strip() for n in os.environ.get("CASRUNS_LOAD_PLUGINS", "").split(",") if n.strip()}
        for ep in sorted(entry_points(group="casruns"), key=lambda e: e.name):
            if only and ep.name not in only:
                continue
            try:
                plugin = ep.load()
            except Exception as e:
                raise PluginError(f"cannot load plugin {ep.name} ({ep.value}): {type(e).__name__}: {e}", plugin=ep.name) from None
            dist = getattr(ep, "dist", None)
            where = f"{dist.name} {dist.version}" if dist is not None else ep.value
            self.register(plugin, ep.name, f"entry point ({where})")

    def load_module(self, name: str) -> None:
        try:
            module = importlib.import_module(name)
        except Exception as e:
            raise PluginError(f"cannot load plugin module {name}: {type(e).__name__}: {e}", plugin=name) from None
        self.register(module, name, "module")

    # -- calling -------------------------------------------------------------------------
    def _impls(self, hook_name: str):
        caller = getattr(self.pm.hook, hook_name)
        # pluggy calls the last registered implementation first; keep its order.
        return list(reversed(caller.get_hookimpls()))

    def _call_impl(self, impl, hook_name: str, kwargs: dict[str, Any]) -> Any:
        """One implementation, traced when ``CASRUNS_TRACE_PLUGINS`` is set.

        Hooks are called through ``impl.function`` (to know which plugin failed), which
        bypasses pluggy's own tracing; so the trace is written here, one line per call.
        """
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        if not self.trace:
            return impl.function(**args)
        t0 = time.perf_counter()
        try:
            res = impl.function(**args)
        except BaseException as e:
            _trace_line(impl.plugin_name, hook_name, t0, f"raised {type(e).__name__}")
            raise
        _trace_line(impl.plugin_name, hook_name, t0, f"returned {'None' if res is None else type(res).__name__}")
        return res

    def call(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation; return ``[(plugin name, result)]`` for non-None results.

        Raises PluginError naming the plugin and the hook if one raises.
        """
        results = []
        for impl in self._impls(hook_name):
            try:
                res = self._call_impl(impl, hook_name, kwargs)
            except Exception as e:
                raise PluginError(
                    f"plugin {impl.plugin_name} failed in {hook_name}: {type(e).__name__}: {e}",
                    plugin=impl.plugin_name,
                    hook=hook_name,
                ) from e
            if res is not None:
                results.append((impl.plugin_name, res))
        return results

    def notify(self, hook_name: str, **kwargs: Any) -> list[str]:
        """Like :meth:`call` but never raises; returns the error messages."""
        errors = []
        for impl in self._impls(hook_name):
            try:
                self._call_impl(impl, hook_name, kwargs)
            except Exception as e:
                errors.append(f"plugin {impl.plugin_name} failed in {hook_name}: {type(e).__name__}: {e}")
        return errors

    def providers(self) -> dict[str, str]:
        """Provider name -> plugin name."""
        out: dict[str, str] = {}
        for plugin, names in self.call("casruns_providers"):
            if not isinstance(names, (list, tuple)):
                raise PluginError(f"plugin {plugin}: casruns_providers must return a list of names", plugin=plugin)
            for n in names:
                out.setdefault(str(n), plugin)
        return out

    def info(self) -> list[PluginInfo]:
        providers = self.providers()
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda t: t[0]):
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            module = getattr(plugin, "__name__", type(plugin).__module__)
            out.append(
                PluginInfo(name, self.sources.get(name, "unknown"), module, hooks, sorted(p for p, owner in providers.items() if owner == name))
            )
        return out


def _trace_line(plugin: str, hook: str, t0: float, outcome: str) -> None:
    """``casruns trace: <plugin> <hook> <ms>ms <outcome>`` on stderr, in one write (hooks run on
    several threads in the supervisor). Names and the result's type only, never a value: an
    argument or a result can hold a secret, and the supervisor's stderr is its log file."""
    ms = (time.perf_counter() - t0) * 1000
    sys.stderr.write(f"casruns trace: {plugin} {hook} {ms:.3f}ms {outcome}\n")
    sys.stderr.flush()


def env_plugins() -> list[str]:
    return [n.strip() for n in os.environ.get("CASRUNS_PLUGINS", "").split(",") if n.strip()]


def load(modules: Iterable[str] = (), *, entry_points: bool = True) -> Plugins:
    """Load the entry-point plugins, then ``modules``, then ``CASRUNS_PLUGINS``."""
    plugins = Plugins()
    if entry_points:
        plugins.load_entry_points()
    for name in [*modules, *env_plugins()]:
        plugins.load_module(name)
    return plugins
