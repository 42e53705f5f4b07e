"""The one exception type the core raises for expected failures.

The CLI turns it into a single line on stderr and ``exit_code``; library users
catch it like any other exception.
"""


class MammaclsError(Exception):
    """An expected failure with a message meant for a person (no traceback)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
