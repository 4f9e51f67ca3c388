"""Archive backends: which code opens an archive URL, chosen by the URL's scheme.

A backend is one entry of :data:`BACKENDS`: a scheme (``s3``), a factory that opens the archive
at a URL of that scheme, and the casruns extra that installs what the factory needs (named in
the error when it is missing). A new backend is one entry here, or one returned by a plugin's
``casruns_archive_backends`` hook (for a scheme that is not listed here: a plugin never
replaces a built-in backend). A plain path (no ``scheme://``) is a local directory; a scheme
neither here nor in a plugin goes to fsspec as it is, whose own registry may know it.

A factory is called as ``open(url, config)``, ``config`` being the registry config's
``[archive]`` table (``{}`` without a registry), and returns a ``casruns.archive.Remote``.
This module imports the backends' code only when a factory runs, so naming the table costs
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CasrunsError, PluginError

if TYPE_CHECKING:
    from .remotes import Remote
    from .plugins import Plugins


@dataclass(frozen=True)
class Backend:
    """How to open archives of one URL scheme."""

    open: Callable[[str, dict[str, Any]], Remote]  # (url, the config's [archive] table) -> Remote
    extra: str = "archive"  # ``pip install 'casruns[<extra>]'`` installs what ``open`` imports


def _local(url: str, config: dict[str, Any]) -> Remote:
    from .remotes import LocalRemote

    return LocalRemote(url.split("://", 1)[1] if "://" in url else url)


def _fsspec(url: str, config: dict[str, Any]) -> Remote:
    from .remotes import FsspecRemote

    return FsspecRemote(url, {}, extra=EXTRAS.get(url.split("://", 1)[0].lower(), "archive"))


def _s3(url: str, config: dict[str, Any]) -> Remote:
    """S3 and S3-compatible stores (MinIO, R2): the endpoint and region come from the config's
    ``[archive]`` table or the environment; credentials from the usual AWS variables."""
    from .remotes import FsspecRemote

    opts: dict[str, Any] = {}
    endpoint = config.get("endpoint_url") or os.environ.get("CASRUNS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if config.get("region"):
        opts["client_kwargs"] = {"region_name": config["region"]}
    return FsspecRemote(url, opts, extra="s3")


LOCAL = Backend(_local, extra="")  # a path or file://: nothing beyond casruns
FSSPEC = Backend(_fsspec, extra="archive")  # any scheme fsspec knows

BACKENDS: dict[str, Backend] = {
    "file": LOCAL,
    "local": FSSPEC,  # fsspec's local filesystem (renames; no durable fsync)
    "s3": Backend(_s3, extra="s3"),
    "s3a": Backend(_s3, extra="s3"),
    "gs": Backend(_fsspec, extra="gcs"),
    "gcs": Backend(_fsspec, extra="gcs"),
    "sftp": Backend(_fsspec, extra="sftp"),
    "ssh": Backend(_fsspec, extra="sftp"),
}

# scheme -> extra, for the message of a backend whose library is missing (archive.FsspecRemote)
EXTRAS = {scheme: b.extra for scheme, b in BACKENDS.items() if b.extra}


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case; ``""`` for a plain path."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def plugin_backends(plugins: Plugins) -> dict[str, tuple[str, Backend]]:
    """Scheme -> (plugin, backend) from ``casruns_archive_backends``; the first plugin called
    that names a scheme keeps it."""
    out: dict[str, tuple[str, Backend]] = {}
    for plugin, entries in plugins.call("casruns_archive_backends"):
        if not isinstance(entries, dict) or not all(isinstance(k, str) and isinstance(v, Backend) for k, v in entries.items()):
            raise PluginError(
                f"plugin {plugin}: casruns_archive_backends must return {{scheme: casruns.backends.Backend}}",
                plugin=plugin, hook="casruns_archive_backends",
            )
        for scheme, backend in entries.items():
            out.setdefault(scheme.lower(), (plugin, backend))
    return out


def open_archive(url: str, config: Callable[[], dict[str, Any]], plugins: Callable[[], Plugins] | None = None) -> Remote:
    """Open the archive at ``url`` with the backend its scheme names.

    ``config`` returns the ``[archive]`` table and ``plugins`` the loaded plugins; both are
    called only when needed (a local path reads neither; plugins load only for a scheme
    that is not built in).
    """
    from .remotes import Remote

    scheme = scheme_of(url)
    backend = LOCAL if not scheme else BACKENDS.get(scheme)
    owner = None
    if backend is None and plugins is not None:
        owner, backend = plugin_backends(plugins()).get(scheme, (None, None))
    backend = backend or FSSPEC
    try:
        remote = backend.open(url, config() if backend is not LOCAL else {})
    except CasrunsError:
        raise
    except Exception as e:
        if owner is None:
            raise
        raise PluginError(
            f"plugin {owner} failed to open {scheme}:// archive: {type(e).__name__}: {e}", plugin=owner, hook="casruns_archive_backends"
        ) from e
    if not isinstance(remote, Remote):
        raise PluginError(
            f"plugin {owner}: the backend for {scheme}:// returned {type(remote).__name__}, not a casruns.archive.Remote",
            plugin=owner, hook="casruns_archive_backends",
        )
    return remote
