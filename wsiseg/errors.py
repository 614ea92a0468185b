"""Exceptions that carry a message meant for the user.

Every error that a user can cause (a missing file, a corrupt bundle, an
unsupported option) is raised as a :class:`WsisegError` subclass whose message
is one line saying what is wrong and what to do.  The command line prints that
line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class WsisegError(Exception):
    """Base class of user-facing errors; ``str(err)`` is a one-line message."""


class ModelConfigError(WsisegError, ValueError):
    """An architecture, backbone or class count that wsiseg cannot build."""


class WeightsError(WsisegError):
    """A weights file that is missing, unreadable or does not fit the model."""


class BundleError(WsisegError):
    """A model bundle that is missing, corrupt, truncated or inconsistent."""


class InputError(WsisegError, ValueError):
    """An input image or parameter that cannot be processed."""


class OutputBusyError(WsisegError):
    """An output folder that another run is writing (its lock file is held)."""


class DiskFullError(WsisegError):
    """The device holding the output has no space (or quota) left."""
