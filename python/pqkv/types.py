"""pqkv's small value types: dtypes, model geometry, budgets and options.

Option fields left as None keep libpqkv's own default (filled by
pqkv_*_options_init), so a newer library's defaults apply unchanged.
"""

from __future__ import annotations

import enum
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union


class DType(enum.IntEnum):
    """pqkv_dtype: element type of keys, values, queries and outputs."""

    BF16 = 0
    F16 = 1
    F32 = 2

    @classmethod
    def parse(cls, value: Union["DType", str, Any]) -> "DType":
        """From a DType, a name ("bf16", "bfloat16", "fp16", "float16", "fp32",
        "float32"), a numpy dtype or a torch dtype."""
        if isinstance(value, DType):
            return value
        name = str(value).lower().replace("torch.", "")
        aliases = {
            "bf16": cls.BF16,
            "bfloat16": cls.BF16,
            "f16": cls.F16,
            "fp16": cls.F16,
            "float16": cls.F16,
            "half": cls.F16,
            "f32": cls.F32,
            "fp32": cls.F32,
            "float32": cls.F32,
            "float": cls.F32,
        }
        if name not in aliases:
            from .errors import InvalidArgumentError

            raise InvalidArgumentError(f"unknown dtype {value!r}: use bf16, fp16 or fp32")
        return aliases[name]


class GqaAggregation(enum.IntEnum):
    """pqkv_gqa_aggregation: how per-query-head scores become one per KV head."""

    SOFTMAX_SUM = 0  # PQCache: per-head softmax summed over the group
    MAX = 1  # the largest per-head probability in the group


@dataclass
class ModelSpec:
    """The attention geometry a store holds keys and values for.

    num_layers: attention layers; num_q_heads: query heads per layer;
    num_kv_heads: key/value heads per layer (divides num_q_heads: GQA);
    head_dim: channels per head (even, at most 512); dtype: how keys and
    values are stored.
    """

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: DType = DType.BF16

    @classmethod
    def preset(cls, name: str) -> "ModelSpec":
        """A named geometry: llama-3.1-8b, mistral-7b, qwen2.5-7b, tiny, tiny-mha."""
        from . import _lib
        from ._args import c_str

        s = _lib.ModelSpecStruct()
        _lib.library().call("pqkv_model_spec_preset", c_str(name, "preset name"), s)
        return cls(s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim, DType(s.dtype))

    @classmethod
    def from_hf_config(cls, config: Any, dtype: Union[DType, str, Any] = DType.BF16) -> "ModelSpec":
        """The geometry of a Hugging Face Llama-family config (LlamaConfig,
        MistralConfig, Qwen2Config, ...)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        q_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or q_heads
        return cls(text.num_hidden_layers, q_heads, kv_heads, head_dim, DType.parse(dtype))

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class TokenCount:
    """A token count: max(tokens, ceil(ratio * context length))."""

    tokens: int = 0
    ratio: float = 0.0

    @classmethod
    def of(cls, value: "TokenCountLike", name: str = "token count") -> "TokenCount":
        """From a TokenCount, an int (tokens), a float in [0, 1] (ratio of the
        context), a (tokens, ratio) pair, or a string "32", "5%", "64+5%".

        `name` names the argument in errors: TypeError for a value of another
        type, InvalidArgumentError for a string outside that grammar.
        """
        from ._args import c_float, c_int
        from .errors import InvalidArgumentError

        if isinstance(value, TokenCount):
            return value
        if isinstance(value, bool):
            raise TypeError(f"{name} is a token count, not a bool ({value})")
        if isinstance(value, str):
            # The grammar of the command line's flags (TokenCount::parse): a
            # share is a percentage up to 100% or a fraction below 1, so that
            # "1.0" is refused there and here alike rather than read as 100%.
            tokens, ratio = 0, 0.0
            try:
                for part in value.replace(" ", "").split("+"):
                    if part.endswith("%"):
                        ratio = float(part[:-1]) / 100.0
                        if not 0.0 <= ratio <= 1.0:
                            raise ValueError(part)
                    elif "." in part:
                        ratio = float(part)
                        if not 0.0 <= ratio < 1.0:
                            raise ValueError(part)
                    else:
                        tokens = int(part)
                        if tokens < 0:
                            raise ValueError(part)
            except ValueError:
                raise InvalidArgumentError(
                    f"{name} {value!r} is not a token count: give tokens ('32'), a share of "
                    "the context ('5%', at most '100%', or a fraction below 1, '0.05'), or "
                    "both ('64+5%')"
                ) from None
            return cls(tokens, ratio)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(c_int(value[0], f"{name} tokens", "int64"), c_float(value[1], f"{name} ratio"))
        try:  # ints, numpy integers
            return cls(tokens=operator.index(value))
        except TypeError:
            pass
        if isinstance(value, numbers.Real):  # floats, numpy floats
            return cls(ratio=float(value))
        raise TypeError(
            f"{name}: cannot read a token count from {type(value).__name__} {value!r}; give an "
            "int (tokens), a float (share of the context), a (tokens, ratio) pair or a str"
        )


TokenCountLike = Union[TokenCount, int, float, Tuple[int, float], str]


@dataclass
class SequenceOptions:
    """Options of one sequence; None keeps libpqkv's default.

    pq_m: PQ sub-spaces (divides head_dim; default head_dim / 8);
    pq_bits: bits per code, 1..8 (default 8); kmeans_iters: Lloyd iterations
    (default 20); sink / window / top_k: the decode budget, each a token count
    (defaults 32 tokens, 5% and 5% of the context); fixed_at_prefill:
    PQCache's budget frozen at the prompt length (default False);
    aggregation: GQA score aggregation (default SOFTMAX_SUM); selection: how
    the top-K tokens are picked, "int4" (default), "int8", "pq", "oracle" or
    two stages such as "pq+int8:4"; resident_sink_window:
    on a CUDA store keep each layer's sink and window in GPU memory from
    reserve() on (default True); refit_threshold: refit a layer's codec off
    the decode path (a background thread on cpu, the index's build stream on
    a CUDA store) when the quantization error of keys appended since its fit
    passes this ratio to the fit's own, > 1, 0 = off (default);
    refit_min_tokens: tokens appended since a layer's last fit
    before a refit may start (default 512).
    """

    pq_m: Optional[int] = None
    pq_bits: Optional[int] = None
    kmeans_iters: Optional[int] = None
    sink: Optional[TokenCountLike] = None
    window: Optional[TokenCountLike] = None
    top_k: Optional[TokenCountLike] = None
    fixed_at_prefill: Optional[bool] = None
    aggregation: Optional[GqaAggregation] = None
    selection: Optional[str] = None
    resident_sink_window: Optional[bool] = None
    refit_threshold: Optional[float] = None
    refit_min_tokens: Optional[int] = None

    @classmethod
    def everything(cls, **kw: Any) -> "SequenceOptions":
        """A budget that covers every token: decode attention is exact."""
        return cls(sink=0, window=1.0, top_k=0, **kw)

    def to_struct(self) -> Any:
        from . import _lib
        from ._args import c_float, c_int, c_str
        from .errors import InvalidArgumentError

        s = _lib.SequenceOptionsStruct()
        _lib.library().fn("pqkv_sequence_options_init")(s)
        for name in ("pq_m", "pq_bits", "kmeans_iters"):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, c_int(value, name))
        for name in ("sink", "window", "top_k"):
            value = getattr(self, name)
            if value is not None:
                count = TokenCount.of(value, name)
                tokens = c_int(count.tokens, f"{name} tokens", "int64")
                setattr(s, name, _lib.TokenCountStruct(tokens, float(count.ratio)))
        if self.fixed_at_prefill is not None:
            s.fixed_at_prefill = 1 if self.fixed_at_prefill else 0
        if self.aggregation is not None:
            s.aggregation = c_int(self.aggregation, "aggregation")
        if self.selection is not None:
            s.selection = c_str(self.selection, "selection")
        if self.resident_sink_window is not None:
            s.resident_sink_window = 1 if self.resident_sink_window else 0
        if self.refit_threshold is not None:
            s.refit_threshold = c_float(self.refit_threshold, "refit_threshold")
        if self.refit_min_tokens is not None:
            n = c_int(self.refit_min_tokens, "refit_min_tokens", "int64")
            if n == 0:  # C reads a 0 as "the default"; here None says that
                raise InvalidArgumentError(
                    "refit_min_tokens must be >= 1, got 0 (None keeps the default, 512)"
                )
            s.refit_min_tokens = n
        return s


@dataclass(frozen=True)
class DriftStats:
    """One layer's drift (Sequence.drift_stats, pqkv_drift_stats).

    tracking: False when nothing is tracked (exact keys, a restored index);
    fit_tokens: keys the current codec was fit on; tokens_since_fit: keys
    appended since; mean_error_ratio / max_error_ratio: over KV heads, the mean
    squared quantization error of those keys over that of the fit's keys (about
    1 without drift); refits: refits swapped in; refit_running: one is being
    built; last_refit_ms / total_refit_ms: wall time of the last refit's build
    and of all, off the decode path.
    """

    tracking: bool
    fit_tokens: int
    tokens_since_fit: int
    mean_error_ratio: float
    max_error_ratio: float
    refits: int
    refit_running: bool
    last_refit_ms: float
    total_refit_ms: float


@dataclass
class StoreOptions:
    """Options of a store.

    spec: the geometry (a ModelSpec or a preset name); device: "cpu" (default),
    "cuda", "cuda:N" or an int ordinal, where search and attention run;
    dram_budget_bytes: host memory for all sequences' keys and values, bytes,
    0 = unlimited (default); num_threads: CPU workers, 0 = one per core;
    hbm_budget_bytes: on a CUDA store, GPU memory for the sequences' resident
    sink and window rows, 0 = unlimited (default 8 GiB); block_cache_bytes:
    bytes of block-cache slots shared by the sequences (HBM on a CUDA store,
    charged to hbm_budget_bytes), 0 = none (default); block_cache_tokens:
    tokens per cache block, a power of two from 1 to 128 (default 64; 1 on a
    CUDA store: hot rows, whose policy runs on the device);
    block_cache_aging_steps: steps between halvings of the blocks' access
    counts, 0 = plain LFU (default 16); block_cache_admit_steps: steps a
    block must be picked at (its aged access count) before the cache admits
    it, >= 1 (1 or 2 with block_cache_tokens 1; default 1); spill_to_disk: on a store with a
    directory and a dram_budget_bytes, move cold rows to spill files under the
    directory when the budget is reached instead of failing (default False;
    with a block cache on cpu stores only; on a CUDA store a step with spilled
    rows synchronises its stream); dram_prealloc_bytes: host memory for rows (pinned
    on a CUDA store) taken when the store opens, charged to dram_budget_bytes,
    so that appends up to it allocate nothing (Store.preallocate_dram), 0 =
    none (default); directory: where
    saved sequences live across restarts (Store.save, Store.open_sequence), a
    RocksDB catalog and segment files, made when missing; None (default): in
    memory only; model_fingerprint: identifies the model (a weights hash, a
    name with a revision), saved with each sequence; open_sequence refuses a
    sequence saved under another one. Default "".
    """

    spec: Union[ModelSpec, str]
    device: Union[str, int] = "cpu"
    dram_budget_bytes: Optional[int] = None
    num_threads: Optional[int] = None
    hbm_budget_bytes: Optional[int] = None
    block_cache_bytes: Optional[int] = None
    block_cache_tokens: Optional[int] = None
    block_cache_aging_steps: Optional[int] = None
    spill_to_disk: bool = False
    dram_prealloc_bytes: Optional[int] = None
    directory: Optional[str] = None
    model_fingerprint: Optional[str] = None
    # Last: fields are appended, so positional arguments keep their meaning.
    block_cache_admit_steps: Optional[int] = None

    def cuda_device(self) -> int:
        """The C ABI's cuda_device: -1 for cpu, else the ordinal."""
        d = self.device
        if isinstance(d, int) and not isinstance(d, bool):
            from ._args import c_int
            from .errors import InvalidArgumentError

            ordinal = c_int(d, "device")
            # The C ABI reads any negative value as the CPU.
            if ordinal < 0:
                raise InvalidArgumentError(
                    f"device {ordinal}: a GPU ordinal is >= 0; use 'cpu' for the CPU"
                )
            return ordinal
        d = str(d)
        if d == "cpu":
            return -1
        if d == "cuda":
            return 0
        if d.startswith("cuda:") and d[5:].isdigit():
            return int(d[5:])
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(f"device {d!r}: use 'cpu', 'cuda', 'cuda:N' or an ordinal")

    def resolved_spec(self) -> ModelSpec:
        """The ModelSpec of `spec` (a preset name resolved); TypeError for anything else."""
        if isinstance(self.spec, str):
            return ModelSpec.preset(self.spec)
        if not isinstance(self.spec, ModelSpec):
            raise TypeError(
                f"spec must be a ModelSpec or a preset name, got {type(self.spec).__name__}"
            )
        return self.spec

    def to_struct(self) -> Any:
        from . import _lib
        from ._args import c_int, c_path, c_str

        spec = self.resolved_spec()
        cspec = _lib.ModelSpecStruct(
            c_int(spec.num_layers, "spec.num_layers"),
            c_int(spec.num_q_heads, "spec.num_q_heads"),
            c_int(spec.num_kv_heads, "spec.num_kv_heads"),
            c_int(spec.head_dim, "spec.head_dim"),
            int(DType.parse(spec.dtype)),
        )
        s = _lib.StoreOptionsStruct()
        _lib.library().fn("pqkv_store_options_init")(s, cspec)
        s.cuda_device = self.cuda_device()
        int64_fields = ("dram_budget_bytes", "hbm_budget_bytes", "block_cache_bytes")
        for name in int64_fields + ("block_cache_tokens",):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, c_int(value, name, "int64"))
        for name in ("num_threads", "block_cache_aging_steps", "block_cache_admit_steps"):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, c_int(value, name))
        # The C ABI reads 0 in these as "the default" (a zeroed struct); here
        # None says that, and 0 is out of their range as in C++.
        for name, default in (("block_cache_tokens", 64), ("block_cache_admit_steps", 1)):
            if getattr(self, name) == 0:
                from .errors import InvalidArgumentError

                raise InvalidArgumentError(
                    f"{name} must be >= 1, got 0 (None keeps the default, {default})"
                )
        s.spill_to_disk = 1 if self.spill_to_disk else 0
        if self.dram_prealloc_bytes is not None:
            s.dram_prealloc_bytes = c_int(self.dram_prealloc_bytes, "dram_prealloc_bytes", "int64")
        # ctypes keeps the bytes alive as long as the struct.
        if self.directory is not None:
            s.directory = c_path(self.directory, "directory")
        if self.model_fingerprint is not None:
            s.model_fingerprint = c_str(self.model_fingerprint, "model_fingerprint")
        return s
