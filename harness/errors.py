"""The one base for problems a user can fix. The CLI prints any `UserError` as one `error:` line and
exits 2; everything else is a bug and keeps its traceback. Each layer subclasses it with a name that
says what was wrong (a config, a dataset file, a study file, a store), so callers can still catch the
specific kind. models/ never imports harness/, so its own errors are listed beside this one in cli."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, printed as one line."""
