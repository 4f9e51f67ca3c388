"""Entry point of the ``casruns`` command: the fast path for polls, else the click CLI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from .cli.fast import try_run

    code = try_run(args)
    if code is None:
        from .cli.app import run_cli

        code = run_cli(args)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
