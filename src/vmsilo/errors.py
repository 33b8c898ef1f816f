"""Error types shared by every part of vmsilo.

Every failure a user can see is a :class:`VmsiloError` carrying a message and a hint; the CLI
entry points turn it into ``error: <message> (hint: <hint>)`` and an exit status, never a
traceback. The subclasses are named after the VM state that makes an action impossible, in the
manner of qubesadmin's exception hierarchy, so callers catch exactly the case they handle.
"""

from __future__ import annotations


class VmsiloError(Exception):
    """A user-facing failure with a hint saying what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class UsageError(VmsiloError):
    """Bad command-line input."""


class UnknownVMError(VmsiloError):
    """A VM name that is not in the configuration."""


class VMNotRunningError(VmsiloError):
    """The action needs a running VM."""


class VMAlreadyRunningError(VmsiloError):
    """The action needs a stopped VM."""


class VMInUseError(VmsiloError):
    """A netvm that still routes running clients."""


class VMStartError(VmsiloError):
    """The VM failed to start or to become ready in time."""


class ImageMissingError(VmsiloError):
    """The guest image the VM needs has not been built."""


def die(message: str, hint: str | None = None) -> VmsiloError:
    """Return (for ``raise die(...)``) the standard user-facing error."""
    return VmsiloError(message, hint)
