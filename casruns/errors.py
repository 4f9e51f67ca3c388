"""Error classes: every failure casruns reports has a stable machine code and an exit code.

One base class, :class:`CasrunsError`. Each subclass carries

* ``code``: a short stable string that ``--json`` errors print (``run_not_found``),
* ``exit_code``: the process exit code the CLI uses for it,
* a one-line message naming the problem (and, for files, the path and the action).

The table of exit codes in ``spec/cli.md`` is checked against these classes by a test,
so adding a class without documenting it fails the suite.
"""

from __future__ import annotations

# Exit codes. Kept small and stable: orchestrators branch on them.
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected internal error
EXIT_USAGE = 2  # command-line syntax (click's own code)
EXIT_INVALID = 3  # the input was understood but is not acceptable
EXIT_NOT_FOUND = 4  # run, blob or artifact does not exist
EXIT_CONFLICT = 5  # state does not allow it (transition, idempotency mismatch, busy lock)
EXIT_REGISTRY = 6  # the registry itself: unsupported format, unreadable or corrupt files, I/O
EXIT_INTEGRITY = 7  # stored bytes do not match their address
EXIT_PLUGIN = 8  # a plugin failed or vetoed

# `wait` and `run` map a run's final status to an exit code (spec/cli.md).
EXIT_RUN_FAILED = 10
EXIT_RUN_TIMED_OUT = 11
EXIT_RUN_CANCELLED = 12
EXIT_WAIT_TIMEOUT = 13  # `wait --timeout` elapsed with the run still active
EXIT_FINDINGS = 14  # `scan` (and `verify`) found something to report
EXIT_CURSOR_EXPIRED = 15  # `events --since`: the cursor is older than the oldest journal segment


class CasrunsError(Exception):
    """Base class of every error casruns raises on purpose."""

    code = "error"
    exit_code = EXIT_FAILURE

    def __init__(self, message: str, **details: object) -> None:
        # One line: a message with a newline in it would break log parsers and `--json` consumers.
        self.message = " ".join(str(message).split("\n"))
        self.details = {k: v for k, v in details.items() if v is not None}
        super().__init__(self.message)

    def to_json(self) -> dict:
        err = {"code": self.code, "message": self.message, "exit_code": self.exit_code}
        if self.details:
            err["details"] = self.details
        return {"schema": "casruns/error/v1", "error": err}


class UsageError(CasrunsError):
    """The command line itself is malformed (unknown option, missing argument)."""

    code = "usage"
    exit_code = EXIT_USAGE


class InvalidInput(CasrunsError):
    """A value given by the caller is not acceptable (a duration, a label, a path)."""

    code = "invalid_input"
    exit_code = EXIT_INVALID


class InvalidRunId(InvalidInput):
    code = "invalid_run_id"


class InvalidAddress(InvalidInput):
    code = "invalid_address"


class UnsafePath(InvalidInput):
    """A path would escape the directory it must stay in (``..``, absolute, symlink, NUL)."""

    code = "unsafe_path"


class BackendMissing(InvalidInput):
    """An archive URL whose backend (an optional extra) is not installed."""

    code = "backend_missing"


class UnknownProvider(InvalidInput):
    code = "unknown_provider"


class RunNotFound(CasrunsError):
    code = "run_not_found"
    exit_code = EXIT_NOT_FOUND


class BlobNotFound(CasrunsError):
    code = "blob_not_found"
    exit_code = EXIT_NOT_FOUND


class ArtifactNotFound(CasrunsError):
    code = "artifact_not_found"
    exit_code = EXIT_NOT_FOUND


class Conflict(CasrunsError):
    """The registry's state does not allow the request."""

    code = "conflict"
    exit_code = EXIT_CONFLICT


class RunIdConflict(Conflict):
    """A caller-chosen run id already names a run submitted with a different request."""

    code = "run_id_conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class Busy(Conflict):
    """A lock another process holds (another GC, for example)."""

    code = "busy"


class RegistryError(CasrunsError):
    """The registry cannot be read or written (I/O, permissions, missing files)."""

    code = "registry_error"
    exit_code = EXIT_REGISTRY


class UnsupportedFormat(RegistryError):
    code = "unsupported_format"


class UnsafeRegistry(RegistryError):
    """The registry root (or one of its directories) is owned by another user, writable by group
    or others, or a symlink where a directory belongs: whoever controls it could make casruns
    write outside it. Refused unless ``CASRUNS_ALLOW_UNSAFE_ROOT=1``."""

    code = "unsafe_registry"


class TooLarge(RegistryError):
    """A structured file or blob casruns parses (a tree, a manifest, a marker, a record) is over
    its documented size cap (spec/format.md, "Size caps"); refused while it is read."""

    code = "too_large"


class ArchiveUnavailable(RegistryError):
    """The archive's backend failed: a network error, refused credentials or permissions, a
    service error. Nothing is half-written; what a push or pull finished is in ``details``."""

    code = "archive_unavailable"


class StrayFile(RegistryError):
    """Something that is not a regular file (a FIFO, a socket, a directory, a symlink) where a
    registry file should be: reported and skipped, never opened for reading."""

    code = "stray_file"


class NoSpace(RegistryError):
    """The filesystem holding the registry is full (ENOSPC or EDQUOT)."""

    code = "no_space"


class CorruptManifest(RegistryError):
    code = "manifest_corrupt"


class IntegrityError(CasrunsError):
    """Stored bytes do not hash to their address (or cannot be decoded)."""

    code = "integrity_error"
    exit_code = EXIT_INTEGRITY


class PluginError(CasrunsError):
    code = "plugin_error"
    exit_code = EXIT_PLUGIN


class Unauthorized(InvalidInput):
    """``casruns serve``: a request without a valid token (HTTP 401)."""

    code = "unauthorized"


class Forbidden(InvalidInput):
    """``casruns serve``: an action the server does not allow, or a form without its CSRF token (HTTP 403)."""

    code = "forbidden"


class CursorExpired(CasrunsError):
    """The events after this cursor were partly removed by gc (older than ``events_keep``):
    resynchronize from ``list --json``, which carries a cursor to follow from."""

    code = "cursor_expired"
    exit_code = EXIT_CURSOR_EXPIRED


def from_unexpected(e: BaseException) -> CasrunsError:
    """The one-line error for an exception nobody raised on purpose: an OSError becomes a
    registry error naming the path and what the system said (``no_space`` for a full disk, a
    read-only filesystem named as such); anything else is ``error`` ("internal error")."""
    import errno as errno_mod

    if isinstance(e, OSError) and e.errno is not None:
        where = f" ({e.filename})" if e.filename else ""
        reason = e.strerror or str(e)
        if e.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
            return NoSpace(f"the filesystem is full: {reason}{where}", path=e.filename)
        if e.errno == errno_mod.EROFS:
            return RegistryError(f"the registry is on a read-only filesystem; this command must write{where}", path=e.filename)
        return RegistryError(f"{reason}{where}", path=e.filename)
    return CasrunsError(f"internal error: {type(e).__name__}: {e}")


def all_error_classes() -> list[type[CasrunsError]]:
    """Every error class, base first; used to generate and check the table in spec/cli.md."""
    out: list[type[CasrunsError]] = []
    todo: list[type[CasrunsError]] = [CasrunsError]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
