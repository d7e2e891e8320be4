"""The exceptions a user can fix, raised where the problem is found.

The command line (bench/cli.py, `user_facing`) turns every `UserError` into exit code 2 and its
message, with no traceback; anything else is a bug and is shown as one. A message names the file or
config key, says what was expected, and what to do. The subclasses also derive from the built-in
type that callers already catch (ValueError, RuntimeError), so code outside the command line keeps
working.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad input, a missing or foreign file, no such device."""


class DataError(UserError, ValueError):
    """A dataset that cannot be read as configured; the message names the file or folder."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded, or that belongs to another configuration or model."""


class DeviceError(UserError, RuntimeError):
    """A device that does not exist on this machine."""


class ResultsError(UserError, ValueError):
    """A results CSV that is damaged; it is left as it was."""


class RunBusyError(UserError, RuntimeError):
    """Another process is training the same run folder."""
