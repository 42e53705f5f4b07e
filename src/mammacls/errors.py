"""The one exception type the core raises for expected failures.

The CLI turns it into a single line on stderr and ``exit_code``; library users
catch it like any other exception. A message names the arguments at fault with
:func:`param`: a library user reads ``epochs must be at least 1`` (the Python
name, also in ``error.parameter``), the CLI prints ``--epochs must be at least 1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_MARK = "\x1f"  # ASCII unit separator: never part of a path or a value
_PARAMETER = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*){_MARK}")


def param(name: str) -> str:
    """An argument's name inside an error message, shown as ``name`` in Python and ``--name`` on the CLI."""
    return f"{_MARK}{name}{_MARK}"


class MammaclsError(Exception):
    """An expected failure with a message meant for a person (no traceback)."""

    def __init__(self, message: str, exit_code: int = 1, parameter: str | None = None) -> None:
        super().__init__(message)
        self.template = message
        named = _PARAMETER.findall(message)
        self.parameter = parameter or (named[0] if named else None)  # the argument at fault
        self.message = _PARAMETER.sub(r"\1", message)
        self.exit_code = exit_code

    def __reduce__(self):  # across processes with its exit code
        return (type(self), (self.template, self.exit_code, self.parameter))

    def __str__(self) -> str:
        return self.message

    def with_option_names(self, options: Mapping[str, str] = {}) -> str:
        """The message with each named argument as a command-line option: ``options`` maps an argument
        to its option where the two differ; otherwise ``batch_size`` is ``--batch-size``."""
        return _PARAMETER.sub(lambda found: options.get(found[1], "--" + found[1].replace("_", "-")), self.template)
