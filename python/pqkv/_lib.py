"""Loading libpqkv and binding its C ABI (include/pqkv/pqkv.h) with ctypes.

The library is loaded on first use, not at import, so that `import pqkv` works
on a machine without it and the error says how to fix that. Every function is
resolved lazily by name: a library built before a function existed still
serves every other function, and calling the missing one raises
UnimplementedError naming it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import LibraryNotFoundError, PqkvError, UnimplementedError, check

# --- C types -----------------------------------------------------------------

c_status = ctypes.c_int  # pqkv_status
c_dtype = ctypes.c_int  # pqkv_dtype
c_seq_p = ctypes.c_void_p  # pqkv_sequence*
c_store_p = ctypes.c_void_p  # pqkv_store*

# Newer libraries may append fields to the options structs. The Python
# structs end in this many spare bytes so that pqkv_*_options_init of such a
# library writes its new fields' defaults into memory we own, and they travel
# back unchanged into pqkv_store_open / pqkv_sequence_create.
_SPARE_BYTES = 256


class ModelSpecStruct(ctypes.Structure):
    """pqkv_model_spec."""

    _fields_ = [
        ("num_layers", ctypes.c_int),
        ("num_q_heads", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("dtype", c_dtype),
    ]


class StoreOptionsStruct(ctypes.Structure):
    """pqkv_store_options, with spare room for fields a newer library appends."""

    _fields_ = [
        ("spec", ModelSpecStruct),
        ("cuda_device", ctypes.c_int),
        ("dram_budget_bytes", ctypes.c_int64),
        ("num_threads", ctypes.c_int),
        ("directory", ctypes.c_char_p),
        ("model_fingerprint", ctypes.c_char_p),
        ("hbm_budget_bytes", ctypes.c_int64),
        ("block_cache_bytes", ctypes.c_int64),
        ("block_cache_tokens", ctypes.c_int64),
        ("block_cache_aging_steps", ctypes.c_int),
        ("spill_to_disk", ctypes.c_int),
        ("dram_prealloc_bytes", ctypes.c_int64),
        ("block_cache_admit_steps", ctypes.c_int),
        ("_spare", ctypes.c_uint8 * _SPARE_BYTES),
    ]


class TokenCountStruct(ctypes.Structure):
    """pqkv_token_count: max(tokens, ceil(ratio * context length))."""

    _fields_ = [("tokens", ctypes.c_int64), ("ratio", ctypes.c_double)]


class SequenceOptionsStruct(ctypes.Structure):
    """pqkv_sequence_options, with spare room for fields a newer library appends."""

    _fields_ = [
        ("pq_m", ctypes.c_int),
        ("pq_bits", ctypes.c_int),
        ("kmeans_iters", ctypes.c_int),
        ("sink", TokenCountStruct),
        ("window", TokenCountStruct),
        ("top_k", TokenCountStruct),
        ("fixed_at_prefill", ctypes.c_int),
        ("aggregation", ctypes.c_int),
        ("max_train_points_per_centroid", ctypes.c_int),
        ("seed", ctypes.c_uint64),
        ("selection", ctypes.c_char_p),
        ("resident_sink_window", ctypes.c_int),
        ("refit_threshold", ctypes.c_double),
        ("refit_min_tokens", ctypes.c_int64),
        ("_spare", ctypes.c_uint8 * _SPARE_BYTES),
    ]


class DriftStatsStruct(ctypes.Structure):
    """pqkv_drift_stats."""

    _fields_ = [
        ("tracking", ctypes.c_int),
        ("fit_tokens", ctypes.c_int64),
        ("tokens_since_fit", ctypes.c_int64),
        ("mean_error_ratio", ctypes.c_double),
        ("max_error_ratio", ctypes.c_double),
        ("refits", ctypes.c_int),
        ("refit_running", ctypes.c_int),
        ("last_refit_ms", ctypes.c_double),
        ("total_refit_ms", ctypes.c_double),
    ]


_P = ctypes.POINTER
_VP = ctypes.c_void_p
_VPP = _P(ctypes.c_void_p)

# name -> (restype, argtypes). The order follows pqkv.h.
_PROTOTYPES: Dict[str, Tuple[Any, List[Any]]] = {
    "pqkv_last_error": (ctypes.c_char_p, []),
    "pqkv_last_error_code": (c_status, []),
    "pqkv_status_name": (ctypes.c_char_p, [c_status]),
    "pqkv_version": (ctypes.c_char_p, []),
    "pqkv_model_spec_preset": (c_status, [ctypes.c_char_p, _P(ModelSpecStruct)]),
    "pqkv_store_options_init": (None, [_P(StoreOptionsStruct), _P(ModelSpecStruct)]),
    "pqkv_sequence_options_init": (None, [_P(SequenceOptionsStruct)]),
    "pqkv_store_open": (c_status, [_P(StoreOptionsStruct), _P(c_store_p)]),
    "pqkv_store_close": (None, [c_store_p]),
    "pqkv_store_dram_bytes_used": (ctypes.c_int64, [c_store_p]),
    "pqkv_store_preallocate_dram": (c_status, [c_store_p, ctypes.c_int64]),
    "pqkv_store_dram_bytes_for_tokens": (ctypes.c_int64, [c_store_p, ctypes.c_int64]),
    "pqkv_sequence_create": (
        c_status,
        [c_store_p, ctypes.c_char_p, _P(SequenceOptionsStruct), _P(c_seq_p)],
    ),
    "pqkv_sequence_get": (c_status, [c_store_p, ctypes.c_char_p, _P(c_seq_p)]),
    "pqkv_sequence_drop": (c_status, [c_store_p, ctypes.c_char_p]),
    "pqkv_sequence_save": (c_status, [c_store_p, c_seq_p]),
    "pqkv_sequence_open": (c_status, [c_store_p, ctypes.c_char_p, _P(c_seq_p)]),
    "pqkv_sequence_close": (c_status, [c_store_p, ctypes.c_char_p]),
    "pqkv_store_compact": (c_status, [c_store_p]),
    "pqkv_store_saved_sequence_names": (
        c_status,
        [c_store_p, ctypes.c_char_p, ctypes.c_int64, _P(ctypes.c_int64)],
    ),
    "pqkv_sequence_reserve": (c_status, [c_seq_p, ctypes.c_int64]),
    "pqkv_sequence_check_health": (c_status, [c_seq_p]),
    "pqkv_sequence_length": (ctypes.c_int64, [c_seq_p, ctypes.c_int]),
    "pqkv_sequence_max_selected": (ctypes.c_int64, [c_seq_p, ctypes.c_int]),
    "pqkv_sequence_drift_stats": (c_status, [c_seq_p, ctypes.c_int, _P(DriftStatsStruct)]),
    "pqkv_sequence_append": (
        c_status,
        [c_seq_p, ctypes.c_int, _VP, _VP, ctypes.c_int64, c_dtype, _VP],
    ),
    "pqkv_sequence_finish_prefill": (c_status, [c_seq_p]),
    "pqkv_sequence_attend": (c_status, [c_seq_p, ctypes.c_int, _VP, _VP, c_dtype, _VP]),
    "pqkv_sequence_attend_exact": (c_status, [c_seq_p, ctypes.c_int, _VP, _VP, c_dtype, _VP]),
    "pqkv_attend_batch": (
        c_status,
        [c_store_p, ctypes.c_int, ctypes.c_int, _VPP, _VPP, _VPP, c_dtype, _VP],
    ),
    "pqkv_select_batch": (
        c_status,
        [
            c_store_p,
            ctypes.c_int,
            ctypes.c_int,
            _VPP,
            _VPP,
            c_dtype,
            _P(ctypes.c_int32),
            ctypes.c_int64,
            _P(ctypes.c_int32),
            _VP,
        ],
    ),
}


class Library:
    """A loaded libpqkv: its path and its functions, each bound on first use."""

    def __init__(self, cdll: ctypes.CDLL, path: str) -> None:
        self.cdll = cdll
        self.path = path
        self._bound: Dict[str, Callable[..., Any]] = {}

    def has(self, name: str) -> bool:
        """Whether this library exports the C function `name`."""
        try:
            self._bind(name)
            return True
        except UnimplementedError:
            return False

    def _bind(self, name: str) -> Callable[..., Any]:
        fn = self._bound.get(name)
        if fn is not None:
            return fn
        try:
            fn = getattr(self.cdll, name)
        except AttributeError:
            raise UnimplementedError(
                f"{name} is not in {self.path}: that libpqkv was built from an older pqkv. "
                "Rebuild it (cmake --build build --target pqkv) or point PQKV_LIBRARY at a newer one."
            ) from None
        restype, argtypes = _PROTOTYPES[name]
        fn.restype = restype
        fn.argtypes = argtypes
        self._bound[name] = fn
        return fn

    def fn(self, name: str) -> Callable[..., Any]:
        """The bound C function `name`; UnimplementedError when it is missing."""
        return self._bind(name)

    def call(self, name: str, *args: Any) -> None:
        """Calls a status-returning C function; a non-OK status raises its PqkvError."""
        status = self._bind(name)(*args)
        if status != 0:
            check(status, self.last_error(), self.status_name(status), name)

    def count(self, name: str, *args: Any) -> int:
        """Calls a C function that answers a count, or -1 on an error; an
        error raises the PqkvError of pqkv_last_error_code."""
        n = int(self._bind(name)(*args))
        if n < 0:  # the C function's error value; its message says why
            message = self.last_error() or f"{name} failed"
            code = "pqkv_last_error_code"
            status = int(self._bind(code)()) if self.has(code) else 0
            check(status, message, self.status_name(status), name)  # the class of its code
            raise PqkvError(message, name)  # a library older than pqkv_last_error_code
        return n

    def last_error(self) -> str:
        msg = self._bind("pqkv_last_error")()
        return msg.decode("utf-8", "replace") if msg else ""

    def status_name(self, status: int) -> Optional[str]:
        if not self.has("pqkv_status_name"):
            return None
        name = self._bind("pqkv_status_name")(status)
        return name.decode() if name else None


def _candidates() -> List[str]:
    """Library names to try, in order: PQKV_LIBRARY, then the loader's path."""
    out: List[str] = []
    env = os.environ.get("PQKV_LIBRARY")
    if env:
        out.append(env)
        return out
    found = ctypes.util.find_library("pqkv")
    if found:
        out.append(found)
    out += ["libpqkv.so", "libpqkv.so.0"]
    return out


_lock = threading.Lock()
_library: Optional[Library] = None


def library() -> Library:
    """The process-wide libpqkv, loaded on first call.

    Raises LibraryNotFoundError with the fix when it cannot be loaded.
    """
    global _library
    with _lock:
        if _library is not None:
            return _library
        errors = []
        for name in _candidates():
            try:
                cdll = ctypes.CDLL(name)
            except OSError as e:
                errors.append(f"  {name}: {e}")
                continue
            _library = Library(cdll, _path_of(cdll, name))
            return _library
        env = os.environ.get("PQKV_LIBRARY")
        where = (
            f"PQKV_LIBRARY={env} could not be loaded"
            if env
            else "libpqkv.so is not on the loader's path"
        )
        raise LibraryNotFoundError(
            f"pqkv: {where}:\n"
            + "\n".join(errors)
            + "\nFix: build it (cmake --preset release && cmake --build build --target pqkv) and "
            "export PQKV_LIBRARY=$PWD/build/libpqkv.so, or install it (cmake --install build) "
            "into a directory the loader searches (ldconfig, or LD_LIBRARY_PATH)."
        )


def _path_of(cdll: ctypes.CDLL, name: str) -> str:
    """The file the loader picked for `name` (from /proc/self/maps on Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libpqkv" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return name
