"""The one error type users see: a clear line, exit code 2, no traceback."""

from __future__ import annotations


class CamkdError(Exception):
    """Bad input or state that the user can fix; the CLI prints it as one line and exits 2."""
