"""pqkv's errors: one exception class per pqkv_status code, all under PqkvError.

Every failed C call raises the class of its status with pqkv's own message
(pqkv_last_error), which says what was wrong and what to do.
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class PqkvError(Exception):
    """Base of every pqkv error.

    Attributes:
        status: the pqkv_status code (int), or None for errors raised in Python
            before any C call (a missing library, say).
        status_name: the code's name, e.g. "INVALID_ARGUMENT".
        message: pqkv's message.
        function: the C function that failed, when one did.
    """

    status: Optional[int] = None
    status_name: str = "ERROR"

    def __init__(self, message: str, function: Optional[str] = None) -> None:
        self.message = message
        self.function = function
        text = message or self.status_name
        super().__init__(f"{function}: {text}" if function else text)


class InvalidArgumentError(PqkvError, ValueError):
    """A shape, dtype, device or option the call cannot take (PQKV_INVALID_ARGUMENT)."""

    status, status_name = 1, "INVALID_ARGUMENT"


class FailedPreconditionError(PqkvError):
    """The call is out of order, e.g. attend before finish_prefill (PQKV_FAILED_PRECONDITION)."""

    status, status_name = 2, "FAILED_PRECONDITION"


class NotFoundError(PqkvError):
    """No sequence of that name (PQKV_NOT_FOUND)."""

    status, status_name = 3, "NOT_FOUND"


class AlreadyExistsError(PqkvError):
    """A sequence of that name exists (PQKV_ALREADY_EXISTS)."""

    status, status_name = 4, "ALREADY_EXISTS"


class OutOfRangeError(PqkvError, IndexError):
    """A layer, position or count outside its range (PQKV_OUT_OF_RANGE)."""

    status, status_name = 5, "OUT_OF_RANGE"


class ResourceExhaustedError(PqkvError):
    """A memory budget or capacity is used up (PQKV_RESOURCE_EXHAUSTED)."""

    status, status_name = 6, "RESOURCE_EXHAUSTED"


class UnimplementedError(PqkvError):
    """Not supported by this build or this libpqkv (PQKV_UNIMPLEMENTED)."""

    status, status_name = 7, "UNIMPLEMENTED"


class UnavailableError(PqkvError):
    """A device or resource is not available now, e.g. no GPU (PQKV_UNAVAILABLE)."""

    status, status_name = 8, "UNAVAILABLE"


class IoError(PqkvError):
    """A file or device read or write failed (PQKV_IO_ERROR)."""

    status, status_name = 9, "IO_ERROR"


class CorruptionError(PqkvError):
    """Stored data failed a check (PQKV_CORRUPTION)."""

    status, status_name = 10, "CORRUPTION"


class InternalError(PqkvError):
    """A bug in pqkv (PQKV_INTERNAL): please report it with the message."""

    status, status_name = 11, "INTERNAL"


class LibraryNotFoundError(PqkvError, OSError):
    """libpqkv could not be loaded; the message says how to point pqkv at it."""

    status_name = "LIBRARY_NOT_FOUND"


_BY_STATUS: Dict[int, Type[PqkvError]] = {
    cls.status: cls  # type: ignore[misc]
    for cls in (
        InvalidArgumentError,
        FailedPreconditionError,
        NotFoundError,
        AlreadyExistsError,
        OutOfRangeError,
        ResourceExhaustedError,
        UnimplementedError,
        UnavailableError,
        IoError,
        CorruptionError,
        InternalError,
    )
}


def error_class(status: int) -> Type[PqkvError]:
    """The exception class of a pqkv_status code (PqkvError for an unknown code)."""
    return _BY_STATUS.get(status, PqkvError)


def check(
    status: int, message: str, name: Optional[str] = None, function: Optional[str] = None
) -> None:
    """Raises the error of a non-zero status; returns for PQKV_OK."""
    if status == 0:
        return
    cls = _BY_STATUS.get(status)
    if cls is None:
        err = PqkvError(f"status {status} ({name or 'unknown code'}): {message}", function)
        err.status = status
        raise err
    raise cls(message, function)
