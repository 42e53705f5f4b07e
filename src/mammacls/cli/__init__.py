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
from mammacls.choices import Arch, Augmentation, Backend, ClassWeights, Device, MemoryFormat, Precision
from mammacls.cli.common import _report_option_value, app

__all__ = ["app", "main"]


_METAVARS = {"data": "DIR_OR_CSV", "out": "DIR", "report_dir": "DIR", "explain": "DIR", "lesion_map": "DIR",
             "groups": "CSV", "model": "NAME", "name": "NAME", "imagenet_weights": "auto|VARIANT|FILE",
             # the choices, from the Enums that define them (parsed forgivingly: VGG16, MobileNet-V2)
             "arch": "|".join(Arch.values()), "device": "|".join(Device.values()),
             "backend": "|".join(Backend.values()), "augment": "|".join(Augmentation.values()),
             "precision": "|".join(Precision.values()), "memory_format": "|".join(MemoryFormat.values()),
             "class_weights": "|".join(ClassWeights.values()), "init": "MODEL",
             "cors": "ORIGIN", "host": "HOST", "token": "TOKEN"}
# by Typer's bare type name, or click's type name (other Typer versions)
_TYPE_METAVARS = {"int": "N", "integer": "N", "float": "NUM", "str": "TEXT", "text": "TEXT", "Path": "PATH",
                  "path": "PATH", "list[str]": "NAME"}


def _with_metavars(command):
    """Real metavars in --help (FILE, DIR, the choices) instead of Typer's <bool>, <str>, {paths}."""
    for sub in getattr(command, "commands", {}).values():
        sub.get_help_option = _flag_without_metavar(sub.get_help_option)  # --help is made per context
        for param in sub.params:
            if param.metavar is not None:
                continue
            if param.param_type_name == "argument":
                word = param.name.upper().rstrip("S") if param.nargs != 1 else param.name.upper()
                param.metavar = word
                shown = f"{word}..." if param.nargs != 1 else word
                if not param.required:
                    shown = f"[{shown}]"
                # Typer's own hooks (guarded: internal) would print {PATH}... and <list[Path]>
                if hasattr(param, "_usage_display_name"):
                    param._usage_display_name = lambda shown=shown: shown
                if hasattr(param, "display_type_rich"):
                    param.display_type_rich = lambda ctx: None
            elif getattr(param, "is_flag", False) or getattr(param, "bare_type", lambda: "")() == "bool":
                param.metavar = ""
            else:
                kind = (param.bare_type() if hasattr(param, "bare_type")
                        else getattr(getattr(param, "type", None), "name", ""))
                param.metavar = _METAVARS.get(param.name) or _TYPE_METAVARS.get(kind)
    return command


def _flag_without_metavar(make_option):
    def wrapped(ctx):
        option = make_option(ctx)
        if option is not None:
            option.metavar = ""
        return option
    return wrapped


def main() -> None:
    command = _with_metavars(typer.main.get_command(app))
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
