"""One exception type for every problem the user can fix.

The CLI turns a ``UserError`` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says how to fix it."""
