"""``casruns serve``: an HTTP API and a live web view of a registry (optional extra ``web``).

Read-only by default, on the same facade (:class:`casruns.Registry`) and JSON contracts as the
CLI (spec/http.md). Nothing in the core package imports this package: ``status`` and ``list``
never pay for Starlette, uvicorn or Jinja2.
"""
