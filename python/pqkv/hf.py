"""Hugging Face transformers integration: decode a Llama-family model through pqkv.

    import pqkv.hf
    pqkv.hf.enable(model)                          # attention goes through pqkv
    cache = pqkv.hf.PqkvCache(model.config, pqkv.SequenceOptions(top_k=0.05))
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

How it works. A transformers cache's `update(keys, values)` runs before the
query exists, so pqkv needs both a cache and an attention function:
- PqkvCache.update stores each layer's keys (after RoPE) and values in one
  pqkv sequence per batch row. In the prompt's forward pass it returns the
  prompt's keys and values unchanged, and the attention function attends
  exactly over them (causal); after the last layer the sequences finish
  prefill (PQ codebooks are trained). In a decode step it appends the new
  token and returns it marked with its layer.
- pqkv_attention (registered as "pqkv" with AttentionInterface.register, or
  ALL_ATTENTION_FUNCTIONS on transformers 4.x) sees the mark and runs
  pqkv's decode attention: sink + window + top-K picked by the key index +
  the new token, within the sequence's budget (SequenceOptions).
Keys and values never accumulate in torch: after the prompt they live in pqkv.

Works with transformers 4.49 (torch 1.13, the last release that runs on it)
and 5.x (CacheLayerMixin layers). Limits: greedy or sampled generate with one
token per decode forward (no beam search, assisted decoding or chunked
prefill), unpadded batches, no sliding-window or soft-capped attention.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, List, Optional, Tuple

import torch

from ._lib import library
from .errors import FailedPreconditionError, InvalidArgumentError, UnimplementedError
from .store import Sequence, Store
from .types import DType, ModelSpec, SequenceOptions

try:
    from transformers.cache_utils import Cache
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("pqkv.hf needs transformers (pip install transformers)") from e

try:  # transformers >= 4.56: a cache is a list of CacheLayerMixin layers
    from transformers.cache_utils import CacheLayerMixin

    _LAYERED = True
except ImportError:
    CacheLayerMixin = object  # type: ignore[misc,assignment]
    _LAYERED = False

ATTENTION_NAME = "pqkv"
"""The attn_implementation name pqkv registers."""

_names = itertools.count()

_TORCH_DTYPES = {torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16}


class PqkvLayer(CacheLayerMixin):  # type: ignore[misc,valid-type]
    """One decoder layer's view of a PqkvCache (a CacheLayerMixin on transformers 5).

    length: tokens stored for this layer.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: "PqkvCache", layer_idx: int) -> None:
        if _LAYERED:
            super().__init__()
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.is_initialized = False
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0
        self.attention_seen = False  # pqkv_attention ran for this layer's prompt
        self.pending = False  # a decode token appended, its attention not run yet

    def __repr__(self) -> str:
        return f"PqkvLayer(layer={self.layer_idx}, tokens={self.length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.cache._update(self, key_states, value_states)

    def get_seq_length(self, *args: Any) -> int:
        return self.length

    def get_mask_sizes(self, query_length: Any, *args: Any) -> Tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # some 5.x releases pass cache_position
            query_length = int(query_length.shape[0])
        return self.length + int(query_length), 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache.reset()

    def _unsupported(self, what: str) -> None:
        raise UnimplementedError(
            f"PqkvCache does not support {what}: pqkv keeps one sequence per batch row "
            "(greedy or sampled generate)"
        )

    def reorder_cache(self, beam_idx: Any) -> None:
        self._unsupported("beam search (reorder_cache)")

    def crop(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices: Any) -> None:
        self._unsupported("batch_select_indices")

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class PqkvCache(Cache):
    """A transformers cache whose keys and values live in a pqkv store.

    config: the model's config (Llama, Mistral, Qwen2 and other Llama-family
    models: num_hidden_layers, num_attention_heads, num_key_value_heads,
    head_dim). options: each sequence's PQ code and decode budget (None:
    pqkv's defaults). store: a shared Store of the same geometry; None opens
    one on the first forward pass, on the model's device (a CUDA store for a
    model on a GPU). dtype: how that store keeps keys and values (None: the
    model's dtype; an fp32 model on a GPU stores bf16, the CUDA kernels'
    row types being bf16 and fp16).

    One pqkv sequence per batch row. Use the cache with a model whose
    attention is pqkv (enable(model) or attn_implementation="pqkv"); the
    first decode step raises FailedPreconditionError otherwise.
    Attributes: decode_calls counts pqkv decode attentions (layers x steps).
    """

    def __init__(
        self,
        config: Any,
        options: Optional[SequenceOptions] = None,
        store: Optional[Store] = None,
        dtype: Optional[DType] = None,
    ) -> None:
        library()  # fail early, with the fix, when libpqkv is missing
        self.config = config
        self.num_layers = ModelSpec.from_hf_config(config).num_layers
        layers = [PqkvLayer(self, i) for i in range(self.num_layers)]
        if _LAYERED:
            super().__init__(layers=layers)
        else:
            super().__init__()
            self.layers = layers
        self.options = options or SequenceOptions()
        self.store = store
        self.dtype = dtype
        self._owns_store = store is None
        self.sequences: List[Sequence] = []
        self.prefilled = False
        self.decode_calls = 0
        self._prefix = f"hf-{os.getpid()}-{next(_names)}"

    # --- the transformers Cache interface ------------------------------------

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stores keys [batch, kv_heads, tokens, head_dim] (after RoPE) and values
        of `layer_idx`; returns what the attention function needs (see the module doc)."""
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        """Tokens stored for `layer_idx` (the prompt plus decoded tokens)."""
        idx = layer_idx or 0
        return self.layers[idx].length if idx < len(self.layers) else 0

    def get_max_cache_shape(self, *args: Any) -> Optional[int]:
        """No maximum: -1 on transformers 5, None on 4.x (their conventions)."""
        return -1 if _LAYERED else None

    def get_max_length(self, *args: Any) -> int:
        return -1

    def reorder_cache(self, beam_idx: Any) -> None:
        self.layers[0].reorder_cache(beam_idx)

    def reset(self) -> None:
        """Drops every sequence: the cache is empty again, ready for a new prompt."""
        self._drop_sequences()
        for layer in self.layers:
            layer.length = 0
            layer.pending = False
        self.prefilled = False

    def close(self) -> None:
        """Drops the sequences and closes the store the cache opened itself."""
        self._drop_sequences()
        if self._owns_store and self.store is not None:
            self.store.close()
            self.store = None

    def _drop_sequences(self) -> None:
        if self.store is not None and self.store._handle is not None:
            for seq in self.sequences:
                if seq._handle is not None:
                    self.store.drop(seq.name)
        self.sequences = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- storing ---------------------------------------------------------------

    def _open(self, key_states: torch.Tensor) -> None:
        batch = key_states.shape[0]
        if self.store is None:
            dtype = self.dtype if self.dtype is not None else _TORCH_DTYPES.get(key_states.dtype)
            if dtype is None:
                raise InvalidArgumentError(f"pqkv stores bf16, fp16 or fp32, not {key_states.dtype}")
            if dtype == DType.F32 and key_states.is_cuda:
                dtype = DType.BF16
            spec = ModelSpec.from_hf_config(self.config, dtype)
            device = (key_states.device.index or 0) if key_states.is_cuda else "cpu"
            self.store = Store.open(spec, device=device)
        if not self.sequences:
            self.sequences = [
                self.store.create_sequence(f"{self._prefix}-{b}", self.options)
                for b in range(batch)
            ]
        elif len(self.sequences) != batch:
            raise InvalidArgumentError(
                f"the cache holds {len(self.sequences)} sequences, the batch has {batch} rows"
            )

    def _append(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for b, seq in enumerate(self.sequences):
            seq.append(
                layer_idx,
                key_states[b].transpose(0, 1).contiguous(),  # [tokens, kv_heads, head_dim]
                value_states[b].transpose(0, 1).contiguous(),
            )

    def _update(
        self, layer: PqkvLayer, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        self._open(key_states)
        tokens = key_states.shape[2]
        if not self.prefilled:
            if layer.length > 0:
                raise UnimplementedError(
                    "PqkvCache takes the prompt in one forward pass (no chunked prefill)"
                )
            self._append(layer.layer_idx, key_states, value_states)
            layer.length += tokens
            if layer.layer_idx == self.num_layers - 1:
                for seq in self.sequences:
                    seq.finish_prefill()
                self.prefilled = True
            return _mark(key_states, layer, "prefill"), value_states
        if tokens != 1:
            raise UnimplementedError(
                f"pqkv decodes one token per forward pass after the prompt, got {tokens} "
                "(assisted decoding and multi-turn prefill into one cache are not supported)"
            )
        if not layer.attention_seen or layer.pending:
            raise FailedPreconditionError(
                "the model's attention does not run through pqkv, so decode steps would ignore "
                f"the stored context: call pqkv.hf.enable(model) or load it with "
                f"attn_implementation={ATTENTION_NAME!r}"
            )
        self._append(layer.layer_idx, key_states, value_states)
        layer.length += 1
        layer.pending = True
        return _mark(key_states, layer, "decode"), value_states

    # --- decode attention --------------------------------------------------------

    def _decode(self, layer: PqkvLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """pqkv attention for query [batch, q_heads, 1, head_dim] -> [batch, 1, q_heads, head_dim]."""
        head_dim = query.shape[-1]
        q = query[:, :, 0, :]
        # pqkv scales scores by 1/sqrt(head_dim); fold a model's other scale into q.
        rescale = scaling * math.sqrt(head_dim)
        if abs(rescale - 1.0) > 1e-6:
            q = q * rescale
        q = q.contiguous()
        out = torch.empty_like(q)
        lib = library()
        if len(self.sequences) > 1 and lib.has("pqkv_attend_batch"):
            self.store.attend_batch(layer.layer_idx, self.sequences, q, out)
        else:
            for b, seq in enumerate(self.sequences):
                seq.attend(layer.layer_idx, q[b], out[b])
        layer.pending = False
        self.decode_calls += 1
        return out.unsqueeze(1)


def _mark(t: torch.Tensor, layer: PqkvLayer, stage: str) -> torch.Tensor:
    """A view of `t` that tells pqkv_attention which cache layer it came from."""
    view = t.view(t.shape)
    view._pqkv_layer = layer  # type: ignore[attr-defined]
    view._pqkv_stage = stage  # type: ignore[attr-defined]
    return view


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    """Exact causal attention with GQA, softmax in fp32.

    query [batch, q_heads, q_len, head_dim]; key, value [batch, kv_heads,
    kv_len, head_dim]; attention_mask: None (causal), a bool mask (True =
    attend) or an additive float mask, [batch, 1, q_len, >= kv_len].
    Returns [batch, q_len, q_heads, head_dim].
    """
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    q = query.reshape(b, hkv, hq // hkv, tq, d).float()
    scores = torch.matmul(q, key.float().unsqueeze(2).transpose(-1, -2)) * scaling
    if attention_mask is None:
        row = torch.arange(tq, device=query.device).unsqueeze(1) + (tk - tq)
        allowed = torch.arange(tk, device=query.device).unsqueeze(0) <= row
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        mask = attention_mask[..., :tk].unsqueeze(2)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value.unsqueeze(2))  # [b, hkv, g, tq, d]
    return out.reshape(b, hq, tq, d).transpose(1, 2).contiguous()


def pqkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """The attention function transformers calls (AttentionInterface signature).

    query [batch, q_heads, q_len, head_dim]; key, value as returned by the
    cache. Decode steps of a PqkvCache run pqkv's budgeted attention; the
    prompt, and any cache that is not a PqkvCache, attend exactly.
    Returns (output [batch, q_len, q_heads, head_dim], None).
    """
    if dropout and module.training:
        raise UnimplementedError("pqkv attention is for inference: no attention dropout")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = getattr(key, "_pqkv_layer", None)
    if layer is not None and getattr(key, "_pqkv_stage", None) == "decode":
        return layer.cache._decode(layer, query, scaling), None
    if layer is not None:
        layer.attention_seen = True
    return exact_attention(query, key, value, attention_mask, scaling), None


def register(name: str = ATTENTION_NAME) -> None:
    """Registers pqkv_attention as attn_implementation `name` (idempotent).

    transformers >= 4.50: AttentionInterface.register, plus the sdpa mask
    under the same name on 5.x; 4.49: ALL_ATTENTION_FUNCTIONS.
    """
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(name, pqkv_attention)
    except ImportError:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = pqkv_attention
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(name, sdpa_mask)
    except ImportError:
        pass


def enable(model: Any, name: str = ATTENTION_NAME) -> Any:
    """Registers pqkv's attention and switches `model` to it. Returns the model."""
    register(name)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    return model
