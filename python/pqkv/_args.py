"""Checks of the plain values handed to libpqkv's C ABI.

ctypes converts a Python int to a C int by keeping its low bits, so 2**40
would reach pqkv as 0, and a str with a NUL reaches C cut at the NUL. Every
int, float and str the package passes to C goes through these checks first: a
value of the wrong type is a TypeError and one that C cannot hold an
InvalidArgumentError, each naming the argument.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Union

from .errors import InvalidArgumentError

# C type -> (smallest, largest) value.
_RANGES = {
    "int": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


def c_int(value: Any, name: str, ctype: str = "int") -> int:
    """`value` as a Python int that fits the C type `ctype` (int, int64, uint64).

    Takes ints and integer-like objects (numpy integers); refuses bools,
    floats and strings with TypeError, and values out of range with
    InvalidArgumentError.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got a bool ({value})")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None
    lo, hi = _RANGES[ctype]
    if not lo <= v <= hi:
        raise InvalidArgumentError(f"{name} = {v} is out of range: pqkv takes {lo}..{hi} here")
    return v


def c_float(value: Any, name: str) -> float:
    """`value`, a real number (int, float, numpy scalar), as a C double.

    Refuses bools and strings with TypeError (float("2") would pass a str);
    NaN and infinities go through for pqkv to refuse with its own message.
    """
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number, got {type(value).__name__} {value!r}"
        ) from None


def c_str(value: Any, name: str) -> bytes:
    """`value`, a str, as the UTF-8 bytes of a C string.

    TypeError for anything but a str; InvalidArgumentError for a NUL
    character (C would cut the string there) or text that is not UTF-8
    encodable (lone surrogates).
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if "\0" in value:
        raise InvalidArgumentError(
            f"{name} {value!r} holds a NUL character, which a C string cannot carry; remove it"
        )
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(
            f"{name} {value!r} cannot be encoded as UTF-8 ({e.reason}); pass valid text"
        ) from None


def c_path(value: Union[str, bytes, "os.PathLike[Any]"], name: str) -> bytes:
    """A filesystem path (str, bytes or os.PathLike) as the bytes of a C string."""
    try:
        raw = os.fsencode(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a path (str, bytes or os.PathLike), got {type(value).__name__}"
        ) from None
    if b"\0" in raw:
        raise InvalidArgumentError(f"{name} {value!r} holds a NUL byte; pass a valid path")
    return raw
