"""One exception type for everything a user can fix.

The CLI prints `EdgelmmError` as a single line (what, where, how to fix) and exits non-zero;
anything else is a bug and shows a traceback only with `--debug`.
"""

from __future__ import annotations


class EdgelmmError(Exception):
    """A problem with the user's input or environment, phrased so that they can fix it."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} — {hint}" if hint else message)


class MissingExtraError(EdgelmmError):
    """An optional engine or package is not installed."""

    def __init__(self, what: str, extra: str, module: str):
        super().__init__(
            f"{what} needs the Python package '{module}', which is not installed",
            f"install it with: pip install 'edgelmm[{extra}]'",
        )
