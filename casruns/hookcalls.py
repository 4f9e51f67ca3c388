"""Plugin calls made by the supervisor beyond the bounded hook runner: status notifications
delivered in commit order on a thread of their own (a blocking ``casruns_status_changed`` delays
nothing), and the checked result of ``casruns_collect_artifacts``."""

from __future__ import annotations

import sys
import threading
from typing import Any


class _Notifier:
    """Delivers status changes to ``casruns_status_changed`` in commit order, on one thread."""

    def __init__(self, sup: Any) -> None:  # the supervisor (its plugins and redactor)
        import queue

        self.sup = sup
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="casruns-notify")
        self.thread.start()

    def put(self, old, new, m) -> None:
        self.queue.put((old, new, m))

    def _loop(self) -> None:
        sup = self.sup
        while (item := self.queue.get()) is not None:
            old, new, m = item
            for err in sup.plugins.notify("casruns_status_changed", run_id=sup.run.run_id, old=old, new=new, manifest=m):
                print(f"casruns supervisor: {sup.redactor.text(err)}", file=sys.stderr)

    def close(self, timeout: float) -> None:
        """Let pending notifications finish, for at most ``timeout`` seconds, then abandon them."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            print(f"casruns supervisor: casruns_status_changed did not return within {timeout:g}s; abandoned", file=sys.stderr)


def _excluded_paths(results: list) -> set[str]:
    """The artifact paths ``casruns_collect_artifacts`` asked to leave out, checked: a list of
    relative paths inside the artifact directory (a bare string or a traversal is the plugin's
    error, never a reason to lose the artifacts)."""
    from .errors import PluginError

    out: set[str] = set()
    for plugin, paths in results:
        if not isinstance(paths, (list, tuple, set)) or not all(isinstance(p, str) for p in paths):
            raise PluginError(f"plugin {plugin}: casruns_collect_artifacts must return a list of paths", plugin=plugin, hook="casruns_collect_artifacts")
        for p in paths:
            parts = p.replace("\\", "/").split("/")
            if not p or p.startswith("/") or ".." in parts or "\0" in p:
                raise PluginError(f"plugin {plugin}: casruns_collect_artifacts returned an unsafe path {p!r}", plugin=plugin, hook="casruns_collect_artifacts")
            out.add(p)
    return out
