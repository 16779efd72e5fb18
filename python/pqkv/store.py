"""Store and Sequence: the C ABI's handles as Python objects.

Life of a sequence (see include/pqkv/sequence.h):
    store = Store.open(ModelSpec(...), device="cpu")
    seq = store.create_sequence("chat-1")
    for layer in range(L): seq.append(layer, keys, values)   # keys after RoPE
    seq.finish_prefill()                                     # fits the key indexes
    each decode step, layer by layer:
        seq.append(layer, k, v)                              # one token
        out = seq.attend(layer, queries)

Saving (a store opened with a directory, see docs/python.md):
    store = Store.open(spec, directory="/var/lib/pqkv/m", model_fingerprint="m@rev3")
    seq.save()                                               # atomic; replaces an earlier save
    store.close_sequence("chat-1")                           # or a new process, later:
    seq = store.open_sequence("chat-1")                      # same answers, no index rebuild

Memory: on a cpu store every array is host memory. On a CUDA store, arrays
may be device tensors (torch, CuPy, DLPack) or host arrays; pqkv enqueues its
work on `stream` (default: torch's current stream of the device tensor) and
never synchronises the device for you.

Threads: one sequence is driven by one thread at a time; different sequences
of one store may be driven from different threads. ctypes releases the GIL
during each call.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Dict, List, Optional, Sequence as Seq, Tuple, Union

from . import _lib
from ._args import c_int, c_str
from ._buffers import Buffer, as_buffer, check_shape, empty_like, stream_handle
from .errors import FailedPreconditionError, InvalidArgumentError, check
from .types import DriftStats, DType, ModelSpec, SequenceOptions, StoreOptions

ArrayLike = Any  # numpy array, torch tensor, __cuda_array_interface__ / DLPack producer


class Store:
    """An open pqkv store: the tiers, indexes and workers of many sequences.

    Close it with close() or a `with` block; closing invalidates its sequences.
    """

    def __init__(self, options: StoreOptions) -> None:
        if not isinstance(options, StoreOptions):
            raise TypeError(
                f"Store takes a StoreOptions, got {type(options).__name__}; "
                "or use Store.open(spec, ...)"
            )
        self._lib = _lib.library()
        self.options = options
        self.spec: ModelSpec = options.resolved_spec()
        self.cuda_device: int = options.cuda_device()
        handle = _lib.c_store_p()
        self._lib.call("pqkv_store_open", options.to_struct(), ctypes.byref(handle))
        self._handle: Optional[int] = handle.value
        self._sequences: Dict[str, "Sequence"] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        spec: Union[ModelSpec, str],
        device: Union[str, int] = "cpu",
        dram_budget_bytes: Optional[int] = None,
        num_threads: Optional[int] = None,
        directory: Optional[str] = None,
        model_fingerprint: Optional[str] = None,
    ) -> "Store":
        """Opens a store for `spec` (a ModelSpec or a preset name).

        device: "cpu", "cuda", "cuda:N" or an ordinal: where search and
        attention run. dram_budget_bytes: host memory for keys and values,
        bytes (None: unlimited). num_threads: CPU workers (None: one per core).
        directory: where saved sequences live (made when missing; one store
        opens it at a time); None: in memory only. model_fingerprint:
        identifies the model; open_sequence refuses a sequence saved under
        another one.
        """
        return cls(
            StoreOptions(
                spec,
                device,
                dram_budget_bytes,
                num_threads,
                directory=directory,
                model_fingerprint=model_fingerprint,
            )
        )

    @property
    def handle(self) -> int:
        """The pqkv_store* for C code; FailedPreconditionError once closed."""
        if self._handle is None:
            raise FailedPreconditionError("the store is closed")
        return self._handle

    @property
    def on_gpu(self) -> bool:
        """Whether search and attention run on a GPU."""
        return self.cuda_device >= 0

    def close(self) -> None:
        """Closes the store and frees everything it holds. Idempotent."""
        if self._handle is None:
            return
        for seq in self._sequences.values():
            seq._handle = None
        self._sequences.clear()
        self._lib.fn("pqkv_store_close")(self._handle)
        self._handle = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def dram_bytes_used(self) -> int:
        """Host memory held for keys and values of every sequence, in bytes."""
        return self._lib.count("pqkv_store_dram_bytes_used", self.handle)

    def preallocate_dram(self, nbytes: int) -> None:
        """Takes host memory for rows now, so that later appends allocate none.

        Afterwards at least `nbytes` (rounded up to whole row blocks) of the
        store's held memory is free for appends; only what is not free yet is
        taken, so repeating a call takes nothing until appends use the rows.
        The memory stays held, charged to dram_budget_bytes, until the store
        closes. ResourceExhaustedError when the budget (or the system) cannot
        take it: then nothing is taken and nothing held is lost.
        """
        self._lib.call(
            "pqkv_store_preallocate_dram", self.handle, c_int(nbytes, "nbytes", "int64")
        )

    def dram_bytes_for_tokens(self, tokens: int) -> int:
        """Host bytes of rows one sequence of `tokens` tokens holds in every layer
        (0 for tokens <= 0; 2**63 - 1 when the bytes would pass it)."""
        return self._lib.count(
            "pqkv_store_dram_bytes_for_tokens", self.handle, c_int(tokens, "tokens", "int64")
        )

    def create_sequence(self, name: str, options: Optional[SequenceOptions] = None) -> "Sequence":
        """Creates the sequence `name` (AlreadyExistsError if it exists).

        options: PQ code and decode budget; None keeps every default.
        """
        if options is not None and not isinstance(options, SequenceOptions):
            raise TypeError(f"options must be a SequenceOptions, got {type(options).__name__}")
        handle = _lib.c_seq_p()
        cname = c_str(name, "name")
        opts = (options or SequenceOptions()).to_struct()
        self._lib.call("pqkv_sequence_create", self.handle, cname, opts, ctypes.byref(handle))
        return self._track(name, handle.value)

    def get_sequence(self, name: str) -> "Sequence":
        """The open sequence `name` (NotFoundError if there is none)."""
        with self._lock:
            if name in self._sequences:
                return self._sequences[name]
        handle = _lib.c_seq_p()
        self._lib.call(
            "pqkv_sequence_get", self.handle, c_str(name, "name"), ctypes.byref(handle)
        )
        return self._track(name, handle.value)

    def drop(self, name: str) -> None:
        """Drops the sequence `name` and frees its memory; its Sequence objects
        become unusable (FailedPreconditionError)."""
        self._lib.call("pqkv_sequence_drop", self.handle, c_str(name, "name"))
        with self._lock:
            seq = self._sequences.pop(name, None)
        if seq is not None:
            seq._handle = None

    # --- persistence (a store opened with a directory) -----------------------

    def save(self, seq: "Sequence") -> None:
        """Writes `seq` to the store's directory under its name: its rows,
        codebooks, codes and prefill state, atomically (a failure or a crash
        keeps the earlier save, or none). Replaces an earlier save of the
        name. FailedPreconditionError without a directory; UnimplementedError
        where the sequence's index cannot be saved on this device."""
        self._lib.call("pqkv_sequence_save", self.handle, _sequence(seq, "seq").handle)

    def open_sequence(self, name: str) -> "Sequence":
        """Loads the saved sequence `name`: it answers attend exactly as it did
        when saved (same rows, codebooks and codes; no index rebuild).
        AlreadyExistsError when a sequence of that name is open (close it
        first); NotFoundError when none is saved; FailedPreconditionError when
        it was saved under another model fingerprint or geometry;
        CorruptionError / NotFoundError naming a damaged or missing file."""
        handle = _lib.c_seq_p()
        self._lib.call(
            "pqkv_sequence_open", self.handle, c_str(name, "name"), ctypes.byref(handle)
        )
        return self._track(name, handle.value)

    def close_sequence(self, name: str) -> None:
        """Forgets the open sequence `name` and frees its memory, keeping its
        save; its Sequence objects become unusable. NotFoundError when none
        is open."""
        self._lib.call("pqkv_sequence_close", self.handle, c_str(name, "name"))
        with self._lock:
            seq = self._sequences.pop(name, None)
        if seq is not None:
            seq._handle = None

    def saved_sequence_names(self) -> List[str]:
        """Names of the sequences saved in the directory ([] without one)."""
        fn = "pqkv_store_saved_sequence_names"
        needed = ctypes.c_int64(0)
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            status = self._lib.fn(fn)(self.handle, buf, size, ctypes.byref(needed))
            if status == 0:
                break
            if needed.value <= size:  # not a size problem: raise its error
                check(status, self._lib.last_error(), self._lib.status_name(status), fn)
            size = needed.value  # names saved meanwhile by another thread: grow and ask again
        raw = buf.raw[: needed.value - 1]
        return [n.decode("utf-8", "replace") for n in raw.split(b"\0")[:-1]]

    def compact(self) -> None:
        """Deletes segment files no saved sequence names (left by a crash) and
        compacts the catalog, so dropped sequences stop taking disk space."""
        self._lib.call("pqkv_store_compact", self.handle)

    def _track(self, name: str, handle: Optional[int]) -> "Sequence":
        seq = Sequence(self, name, handle)
        with self._lock:
            self._sequences[name] = seq
        return seq

    def _check_device(self, bufs: Seq[Buffer]) -> None:
        if self.on_gpu:
            return
        for b in bufs:
            if b.on_gpu:
                raise InvalidArgumentError(
                    "this store runs on the CPU: pass host arrays (tensor.cpu()), or open the "
                    "store with device='cuda'"
                )

    def _stream(self, stream: Any, bufs: Seq[Buffer]) -> Optional[int]:
        if stream is not None:
            return stream_handle(stream)
        for b in bufs:
            if b.on_gpu and b.stream is not None:
                return b.stream
        return None

    def _batch(
        self, arrays: Any, n: int, shape: Tuple[int, ...], name: str, writable: bool
    ) -> Tuple[List[Buffer], Any]:
        """Buffers and a void*[n] of per-sequence pointers, from one [n, *shape]
        array or a list of n arrays of `shape`."""
        if isinstance(arrays, (list, tuple)):
            if len(arrays) != n:
                raise InvalidArgumentError(f"{name}: {len(arrays)} arrays for {n} sequences")
            bufs = [as_buffer(a, f"{name}[{i}]", writable) for i, a in enumerate(arrays)]
            for i, b in enumerate(bufs):
                check_shape(b, f"{name}[{i}]", shape, "[q_heads, head_dim]")
            ptrs = [b.ptr for b in bufs]
        else:
            b = as_buffer(arrays, name, writable)
            check_shape(b, name, (n,) + shape, "[n, q_heads, head_dim]")
            step = 4 if b.dtype == DType.F32 else 2  # bytes per element
            for s in shape:
                step *= s
            bufs = [b]
            ptrs = [b.ptr + i * step for i in range(n)]
        return bufs, (ctypes.c_void_p * max(n, 1))(*ptrs)

    def _seq_array(self, seqs: Seq["Sequence"]) -> Any:
        handles = [_sequence(s, f"seqs[{i}]").handle for i, s in enumerate(seqs)]
        return (ctypes.c_void_p * max(len(seqs), 1))(*handles)

    def attend_batch(
        self,
        layer: int,
        seqs: Seq["Sequence"],
        queries: Any,
        outs: Any = None,
        stream: Any = None,
    ) -> Any:
        """One decode step's attention of `layer` for several sequences.

        queries: [n, q_heads, head_dim] or a list of n [q_heads, head_dim]
        arrays, bf16/fp16/fp32; outs: the same shapes and dtype (allocated
        beside the queries when None). Each sequence must have appended this
        step's token to `layer`. Returns outs. Needs pqkv_attend_batch.
        """
        layer = c_int(layer, "layer")
        n = len(seqs)
        if n == 0:  # nothing to attend: what a batch of none gives back
            return [] if outs is None else outs
        q_shape = (self.spec.num_q_heads, self.spec.head_dim)
        qbufs, qptrs = self._batch(queries, n, q_shape, "queries", False)
        if outs is None:
            if isinstance(queries, (list, tuple)):
                outs = [empty_like(b, q_shape) for b in qbufs]
            else:
                outs = empty_like(qbufs[0], (n,) + q_shape)
        obufs, optrs = self._batch(outs, n, q_shape, "outs", True)
        dtype = _same_dtype(qbufs + obufs)
        self._check_device(qbufs + obufs)
        self._lib.call(
            "pqkv_attend_batch",
            self.handle,
            layer,
            n,
            self._seq_array(seqs),
            qptrs,
            optrs,
            int(dtype),
            self._stream(stream, qbufs + obufs),
        )
        return outs

    def select_batch(
        self,
        layer: int,
        seqs: Seq["Sequence"],
        queries: Any,
        max_selected: Optional[int] = None,
        positions: Any = None,
        lengths: Any = None,
        stream: Any = None,
    ) -> Tuple[Any, Any]:
        """The token positions a decode step of `layer` would attend to, without attending.

        queries: [n, q_heads, head_dim] or a list of n [q_heads, head_dim]
        arrays. Returns (positions, lengths): positions [n, kv_heads,
        max_selected] int32, every position attend would read per (sequence,
        KV head) -- sink, top-K picks, window and the newest token -- padded
        with -1; lengths [n, kv_heads] int32, the valid count of each row.
        max_selected defaults to the largest Sequence.max_selected(layer).
        Outputs are allocated beside the queries when None; pass them
        preallocated (and a fixed max_selected) to capture the call in a CUDA
        graph. Needs pqkv_select_batch.
        """
        layer = c_int(layer, "layer")
        n = len(seqs)
        if n == 0:
            raise InvalidArgumentError(
                "select_batch needs at least one sequence: seqs is empty"
            )
        q_shape = (self.spec.num_q_heads, self.spec.head_dim)
        qbufs, qptrs = self._batch(queries, n, q_shape, "queries", False)
        if max_selected is None:
            max_selected = max([s.max_selected(layer) for s in seqs] or [0])
        max_selected = c_int(max_selected, "max_selected", "int64")
        kv = self.spec.num_kv_heads
        if positions is None:
            positions = empty_like(qbufs[0], (n, kv, max_selected), int32=True)
        if lengths is None:
            lengths = empty_like(qbufs[0], (n, kv), int32=True)
        pbuf = _int32_buffer(positions, "positions", (n, kv, max_selected))
        lbuf = _int32_buffer(lengths, "lengths", (n, kv))
        self._check_device(qbufs + [pbuf, lbuf])
        self._lib.call(
            "pqkv_select_batch",
            self.handle,
            layer,
            n,
            self._seq_array(seqs),
            qptrs,
            int(_same_dtype(qbufs)),
            ctypes.cast(pbuf.ptr, ctypes.POINTER(ctypes.c_int32)),
            max_selected,
            ctypes.cast(lbuf.ptr, ctypes.POINTER(ctypes.c_int32)),
            self._stream(stream, qbufs + [pbuf, lbuf]),
        )
        return positions, lengths


class Sequence:
    """One context's keys and values in a store, with a key index per (layer, KV head).

    Obtained from Store.create_sequence / get_sequence; owned by the store.
    """

    def __init__(self, store: Store, name: str, handle: Optional[int]) -> None:
        self.store = store
        self.name = name
        self._handle = handle

    def __repr__(self) -> str:
        state = "dropped" if self._handle is None else f"{self.length(0)} tokens"
        return f"pqkv.Sequence({self.name!r}, {state})"

    @property
    def handle(self) -> int:
        """The pqkv_sequence* for C code; FailedPreconditionError once dropped."""
        if self._handle is None:
            raise FailedPreconditionError(
                f"sequence {self.name!r} was dropped or its store closed"
            )
        return self._handle

    @property
    def spec(self) -> ModelSpec:
        return self.store.spec

    def _count(self, fn: str, layer: int) -> int:
        return self.store._lib.count(fn, self.handle, c_int(layer, "layer"))

    def length(self, layer: int = 0) -> int:
        """Tokens stored for `layer`."""
        return self._count("pqkv_sequence_length", layer)

    def reserve(self, max_tokens: int) -> None:
        """Sizes the sequence for up to `max_tokens` tokens in every layer now
        (host rows charged to the DRAM budget; on a CUDA store also device
        tables, index capacity and the step's workspaces), so that later steps
        allocate nothing: do it before capturing a CUDA graph. Call it after
        finish_prefill for the index capacity to count. ResourceExhaustedError
        names the budget to raise. Needs pqkv_sequence_reserve."""
        self.store._lib.call(
            "pqkv_sequence_reserve", self.handle, c_int(max_tokens, "max_tokens", "int64")
        )

    def check_health(self) -> None:
        """Waits for the appends issued so far (a device sync on a CUDA store)
        and raises InvalidArgumentError when a key or value appended from
        device memory was NaN, Inf or overflowed the store's dtype (drop the
        sequence then), or when an attend into device memory whose stream has
        finished gave a NaN or Inf output (scores or sums past fp32's range;
        raised once). Host outputs and cpu stores raise at the call instead.
        Needs pqkv_sequence_check_health."""
        self.store._lib.call("pqkv_sequence_check_health", self.handle)

    def max_selected(self, layer: int = 0) -> int:
        """Positions per KV head the next select/attend of `layer` needs: sink +
        top-K (or the whole middle) + window, the newest token included. Needs
        pqkv_sequence_max_selected; PqkvError before finish_prefill."""
        return self._count("pqkv_sequence_max_selected", layer)

    def drift_stats(self, layer: int = 0) -> DriftStats:
        """How far the keys appended to `layer` since its codec was fit have
        drifted, and the refits so far. Needs pqkv_sequence_drift_stats;
        FailedPreconditionError before finish_prefill."""
        out = _lib.DriftStatsStruct()
        self.store._lib.call(
            "pqkv_sequence_drift_stats", self.handle, c_int(layer, "layer"), ctypes.byref(out)
        )
        return DriftStats(
            tracking=bool(out.tracking),
            fit_tokens=int(out.fit_tokens),
            tokens_since_fit=int(out.tokens_since_fit),
            mean_error_ratio=float(out.mean_error_ratio),
            max_error_ratio=float(out.max_error_ratio),
            refits=int(out.refits),
            refit_running=bool(out.refit_running),
            last_refit_ms=float(out.last_refit_ms),
            total_refit_ms=float(out.total_refit_ms),
        )

    def _kv(self, keys: Any, values: Any) -> Tuple[Buffer, Buffer]:
        spec = self.spec
        kb = as_buffer(keys, "keys")
        vb = as_buffer(values, "values")
        expected = (None, spec.num_kv_heads, spec.head_dim)
        check_shape(kb, "keys", expected, "[tokens, kv_heads, head_dim]")
        check_shape(vb, "values", expected, "[tokens, kv_heads, head_dim]")
        if kb.shape != vb.shape:
            raise InvalidArgumentError(
                f"keys {list(kb.shape)} and values {list(vb.shape)} differ in shape"
            )
        return kb, vb

    def append(self, layer: int, keys: ArrayLike, values: ArrayLike, stream: Any = None) -> None:
        """Appends tokens to `layer`.

        keys, values: [tokens, kv_heads, head_dim], bf16/fp16/fp32, keys after
        RoPE. Before finish_prefill any chunking is allowed; after it, one
        token per layer per decode step, layer 0 first. NaN or Inf is refused
        and nothing is appended.
        """
        layer = c_int(layer, "layer")
        kb, vb = self._kv(keys, values)
        dtype = _same_dtype([kb, vb])
        self.store._check_device([kb, vb])
        self.store._lib.call(
            "pqkv_sequence_append",
            self.handle,
            layer,
            kb.ptr,
            vb.ptr,
            kb.shape[0],
            int(dtype),
            self.store._stream(stream, [kb, vb]),
        )

    def save(self) -> None:
        """Saves this sequence into its store's directory: Store.save(self)."""
        self.store.save(self)

    def finish_prefill(self) -> None:
        """Ends the prompt: trains one PQ codebook per (layer, KV head) and
        encodes the keys. Every layer must hold the same number of tokens."""
        self.store._lib.call("pqkv_sequence_finish_prefill", self.handle)

    def _attend(self, fn: str, layer: int, queries: Any, out: Any, stream: Any) -> Any:
        layer = c_int(layer, "layer")
        shape = (self.spec.num_q_heads, self.spec.head_dim)
        qb = as_buffer(queries, "queries")
        check_shape(qb, "queries", shape, "[q_heads, head_dim]")
        if out is None:
            out = empty_like(qb, shape)
        ob = as_buffer(out, "out", writable=True)
        check_shape(ob, "out", shape, "[q_heads, head_dim]")
        dtype = _same_dtype([qb, ob])
        self.store._check_device([qb, ob])
        self.store._lib.call(
            fn, self.handle, layer, qb.ptr, ob.ptr, int(dtype), self.store._stream(stream, [qb, ob])
        )
        return out

    def attend(self, layer: int, queries: ArrayLike, out: Any = None, stream: Any = None) -> Any:
        """Decode attention of `layer` over sink + window + top-K + the newest token.

        queries: [q_heads, head_dim] (after RoPE), bf16/fp16/fp32; out: the
        same shape and dtype, allocated beside the queries when None. Scale
        1/sqrt(head_dim). Returns out.
        """
        return self._attend("pqkv_sequence_attend", layer, queries, out, stream)

    def attend_exact(
        self, layer: int, queries: ArrayLike, out: Any = None, stream: Any = None
    ) -> Any:
        """Exact attention of `layer` over every stored token: the reference.

        Shapes and dtypes as attend. Returns out.
        """
        return self._attend("pqkv_sequence_attend_exact", layer, queries, out, stream)


def _sequence(seq: Any, name: str) -> "Sequence":
    """`seq` when it is a Sequence; TypeError naming `name` otherwise."""
    if not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a pqkv.Sequence, got {type(seq).__name__} {seq!r}")
    return seq


def _same_dtype(bufs: Seq[Buffer]) -> DType:
    dtypes = {b.dtype for b in bufs}
    if len(dtypes) != 1:
        names = ", ".join(sorted(d.name for d in dtypes))
        raise InvalidArgumentError(f"every array of one call must have one dtype, got {names}")
    return bufs[0].dtype


def _int32_buffer(x: Any, name: str, shape: Tuple[int, ...]) -> Buffer:
    """A writable int32 buffer of `shape` (numpy or torch)."""
    import numpy as np

    if isinstance(x, np.ndarray):
        if x.dtype != np.int32 or not x.flags.c_contiguous or not x.flags.writeable:
            raise InvalidArgumentError(f"{name}: expected a writable C-contiguous int32 array")
        b = Buffer(x.ctypes.data, DType.F32, tuple(x.shape), "cpu", -1, None, x)
    else:
        from ._buffers import is_torch_tensor

        if not is_torch_tensor(x):
            raise InvalidArgumentError(f"{name}: expected a numpy array or torch tensor of int32")
        import torch

        if x.dtype != torch.int32 or not x.is_contiguous():
            raise InvalidArgumentError(f"{name}: expected a contiguous int32 tensor")
        dev = "cuda" if x.device.type == "cuda" else "cpu"
        stream = torch.cuda.current_stream(x.device).cuda_stream if dev == "cuda" else None
        b = Buffer(x.data_ptr(), DType.F32, tuple(x.shape), dev, x.device.index, stream, x)
    check_shape(b, name, shape, "int32")
    return b
