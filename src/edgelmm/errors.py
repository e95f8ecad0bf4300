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


class RequestError(EdgelmmError):
    """A request that cannot run as given (malformed messages, images that do not match their
    placeholders, token ids outside the vocabulary, a prompt longer than the context). A server
    answers it with a 400 and `code`."""

    def __init__(self, message: str, hint: str | None = None, code: str | None = None, param: str | None = None):
        super().__init__(message, hint)
        self.code = code
        self.param = param


class MissingExtraError(EdgelmmError):
    """An optional engine or package is not installed."""

    def __init__(self, what: str, extra: str, module: str):
        super().__init__(
            f"{what} needs the Python package '{module}', which is not installed",
            f"install it with: pip install 'edgelmm[{extra}]'",
        )
