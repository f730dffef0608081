"""User-facing errors: one clear line naming the culprit, never a bare traceback."""

from __future__ import annotations


class KdError(Exception):
    """A mistake the user can fix (bad params, unreadable seed, unsafe template, ...).

    The message must name the params key, file or record at fault; stages and the CLI print it as one
    line and exit with status 2.
    """


class TeacherError(KdError):
    """The teacher could not answer a request after all allowed attempts."""
