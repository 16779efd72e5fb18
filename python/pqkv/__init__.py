"""pqkv: a KV-cache store for long-context LLM inference, from Python.

Bindings of libpqkv's C ABI (include/pqkv/pqkv.h) with ctypes. numpy arrays
on the host; torch tensors (or any DLPack / __cuda_array_interface__
producer) on the GPU, passed by pointer with the current CUDA stream.

libpqkv is found on the loader's path or at PQKV_LIBRARY=/path/to/libpqkv.so,
loaded on first use. Submodules: pqkv.hf (transformers cache and attention),
pqkv.selector (the selector contract engines consume).
"""

from typing import Optional

from . import _lib
from .errors import (
    AlreadyExistsError,
    CorruptionError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    IoError,
    LibraryNotFoundError,
    NotFoundError,
    OutOfRangeError,
    PqkvError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from .store import Sequence, Store
from .types import (
    DriftStats,
    DType,
    GqaAggregation,
    ModelSpec,
    SequenceOptions,
    StoreOptions,
    TokenCount,
)

__version__ = "0.1.0"


def library_path() -> str:
    """The path of the loaded libpqkv (loads it if needed)."""
    return _lib.library().path


def library_version() -> Optional[str]:
    """libpqkv's version string (pqkv_version), or None for a library too old to have it."""
    lib = _lib.library()
    if not lib.has("pqkv_version"):
        return None
    v = lib.fn("pqkv_version")()
    return v.decode() if v else None


def has_function(name: str) -> bool:
    """Whether the loaded libpqkv exports the C function `name` (e.g. "pqkv_select_batch")."""
    return _lib.library().has(name)


__all__ = [
    "AlreadyExistsError",
    "CorruptionError",
    "DType",
    "DriftStats",
    "FailedPreconditionError",
    "GqaAggregation",
    "InternalError",
    "InvalidArgumentError",
    "IoError",
    "LibraryNotFoundError",
    "ModelSpec",
    "NotFoundError",
    "OutOfRangeError",
    "PqkvError",
    "ResourceExhaustedError",
    "Sequence",
    "SequenceOptions",
    "Store",
    "StoreOptions",
    "TokenCount",
    "UnavailableError",
    "UnimplementedError",
    "has_function",
    "library_path",
    "library_version",
]
