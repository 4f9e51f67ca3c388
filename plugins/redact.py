"""The built-in default redactor: well-known credential shapes, on by default.

Each detector can be switched off in the registry config::

    [redaction.detectors]
    bearer_token = false

The detectors themselves live in ``casruns.redaction.DETECTORS`` (their families and trigger
words are listed in spec/format.md, "Redaction"). They apply to logs, manifest fields, artifact
names and text artifacts alike.
"""

from __future__ import annotations

from casruns.hookspecs import RunContext
from casruns.plugins import hookimpl


@hookimpl
def casruns_redaction(run: RunContext) -> dict:
    from casruns.config import Config
    from casruns.redaction import DETECTORS

    switches = (Config.load(run.registry_root).raw.get("redaction") or {}).get("detectors") or {}
    return {"patterns": {name: rx for name, rx in DETECTORS.items() if switches.get(name, True)}}
