"""What every command shares: the Typer app, consoles, one-line errors, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Annotated, Any

import typer

from mammacls import __version__
from mammacls.choices import Choice, parse_choice
from mammacls.errors import MammaclsError

app = typer.Typer(
    name="mammacls",
    help="Classify breast ultrasound images (benign / malignant / normal): prepare, train, evaluate, predict.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Library argument -> command-line option, where the option is not simply --the-argument.
OPTION_NAMES = {"explain_dir": "--explain", "lesion_dir": "--lesion-map", "repeats": "--repeat",
                "data_dir": "--data", "augmentation": "--augment"}


# Piped or logged output has no terminal width; rich's 80 columns would split a table's intervals
# ("[0.67–0" / ".83]"). COLUMNS, when set, still wins.
PIPED_WIDTH = 160


def _console(stderr: bool = True):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, width=PIPED_WIDTH)
    return console


@contextlib.contextmanager
def _errors(json_out: bool = False):
    """Expected failures: one line on stderr and a non-zero exit, no traceback; with ``--json`` also one
    JSON document on stdout (``{"error": ..., "parameter": ..., "exit_code": ...}``), so a script that
    reads stdout always gets a document."""
    try:
        yield
    except MammaclsError as exc:
        from rich.markup import escape

        message = exc.with_option_names(OPTION_NAMES)
        _console().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        if json_out:
            option = exc.parameter and OPTION_NAMES.get(exc.parameter, "--" + exc.parameter.replace("_", "-"))
            _emit_json({"error": message, "parameter": option, "exit_code": exc.exit_code})
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _console().print("[bold red]interrupted[/]")
        if json_out:
            _emit_json({"error": "interrupted", "parameter": None, "exit_code": 130})
        raise typer.Exit(130) from None


def _transient_bar(label: str):
    """A progress bar on stderr that vanishes when done; none at all when stderr is not a terminal
    (a log or a pipe gets neither the bar nor the blank line a stopped bar leaves)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = _console()
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                    transient=True, disable=not console.is_terminal)


def _quiet_console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"), highlight=False)


def _emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def choice_option(kind: type[Choice], help: str, **settings: Any) -> Any:
    """An option whose value is a member of ``kind``: --help lists the Enum's values once, as the metavar;
    any obvious spelling is accepted (``VGG16``, ``MobileNet-V2``) and a typo gets one line with the
    closest choice, through Typer's own ``parser`` hook."""
    def parse(value: Any) -> Choice:
        try:
            return parse_choice(kind, value, kind.__name__.lower())
        except MammaclsError as exc:
            raise typer.BadParameter(str(exc)) from None

    return typer.Option(help=help, parser=parse, metavar="|".join(kind.values()), **settings)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mammacls {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                          help="Show the version and exit.")] = False,
) -> None:
    """mammacls: honest breast-ultrasound classification."""


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _report_option_value(argv: list[str]) -> list[str]:
    """Let ``evaluate --report DIR`` (and ``--report=DIR``) name the report folder.

    Typer options cannot take an optional value, so ``--report`` is a flag and
    the folder is ``--report-dir``; evaluate has no positional arguments, so a
    bare word after ``--report`` can only be that folder.
    """
    if not argv or argv[0] != "evaluate":
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--report="):
            out += ["--report", "--report-dir", token.split("=", 1)[1]]
        elif token == "--report" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out += ["--report", "--report-dir", argv[i + 1]]
            i += 1
        else:
            out.append(token)
        i += 1
    return out
