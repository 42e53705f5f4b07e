"""Command line: parse options, call the library, print. No torch at import time.

Each command lives in its own module; importing them registers them on the one Typer app."""

from __future__ import annotations

import sys

import typer

# importing a command module registers its commands; this order is --help's
from mammacls.cli import prepare  # noqa: F401
from mammacls.cli import train  # noqa: F401
from mammacls.cli import evaluate  # noqa: F401
from mammacls.cli import predict  # noqa: F401
from mammacls.cli import models  # noqa: F401
from mammacls.cli import serve  # noqa: F401
from mammacls.cli.common import _report_option_value, app

__all__ = ["app", "main"]


def main() -> None:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=_report_option_value(sys.argv[1:]), prog_name="mammacls", standalone_mode=False)
    except Exception as exc:  # click's usage errors (its own or Typer's copy of click): one line, not a panel
        if type(exc).__name__ == "Abort":  # end of input at a prompt
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        if not (callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        if type(exc).__name__ != "NoArgsIsHelpError":  # bare `mammacls`: the help was printed already
            context = getattr(exc, "ctx", None)
            where = f" (see {context.command_path} --help)" if context is not None else ""
            print(f"error: {exc.format_message()}{where}", file=sys.stderr)
            if "--json" in sys.argv[1:]:  # a script reading stdout still gets one document
                from mammacls.cli.common import _emit_json

                _emit_json({"error": exc.format_message(), "parameter": None, "exit_code": exc.exit_code})
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
