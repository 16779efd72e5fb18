"""The selector contract: which tokens a decode step attends to, for an engine's own attention.

This is the core of an engine adapter. An engine that keeps its own KV pages
and attention kernel asks pqkv, per layer and decode step, which token
positions of each request matter, then attends over just those.
Selector.retrieve_topk has the shape of SGLang's sparse-attention slot
(BaseSparseAlgorithm.retrieve_topk):

    positions, lengths = selector.retrieve_topk(queries, layer_id, req_pool_indices, sparse_mask)

queries [bs, q_heads, head_dim] -> positions [bs, max_selected] int32,
ascending, padded with -1, and lengths [bs] int32. The positions are logical
token indices of each request (0 = its first token); the engine maps them to
its physical KV slots (SGLang: req_to_token[req_pool_index, position]).

pqkv selects per KV head. SGLang's slot takes one list per request, so by
default retrieve_topk returns the union of the KV heads' picks (every head
then attends over the union: a superset of pqkv's budget, at most kv_heads
times larger). per_head=True returns pqkv's own selection,
[bs, kv_heads, max_selected] and lengths [bs, kv_heads], for a kernel that
takes one index list per (request, KV head), as pqkv's attend does.

Underneath is pqkv_select_batch, which is graph safe: fixed-size outputs, no
allocation, no host synchronisation, on the caller's stream. This wrapper
reads req_pool_indices and sparse_mask on the host to find the sequences (a
device synchronisation if they live on the GPU); an engine capturing CUDA
graphs keeps one sequence per batch slot and calls Store.select_batch with
preallocated outputs and a fixed max_selected instead.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._buffers import is_torch_tensor
from .errors import InvalidArgumentError, NotFoundError
from .store import Sequence, Store


def _to_host_list(x: Any) -> List[Any]:
    if is_torch_tensor(x):
        return x.detach().cpu().tolist()
    return np.asarray(x).tolist()


def merge_heads(positions: Any, lengths: Any) -> Tuple[Any, Any]:
    """The union over KV heads of per-head selections.

    positions [n, kv_heads, max_selected] int32 padded with -1, lengths
    [n, kv_heads] (unused beyond the padding, kept for symmetry) ->
    (merged [n, kv_heads * max_selected] int32, ascending, each position once,
    padded with -1; counts [n] int32). numpy arrays or torch tensors (on any
    device: sorts only, no host round trip).
    """
    del lengths
    n = positions.shape[0]
    big = np.iinfo(np.int32).max
    if is_torch_tensor(positions):
        import torch

        flat = positions.reshape(n, -1).to(torch.int64)
        flat = torch.where(flat < 0, torch.full_like(flat, big), flat)
        flat, _ = torch.sort(flat, dim=1)
        dup = torch.zeros_like(flat, dtype=torch.bool)
        dup[:, 1:] = flat[:, 1:] == flat[:, :-1]
        flat = torch.where(dup, torch.full_like(flat, big), flat)
        flat, _ = torch.sort(flat, dim=1)
        counts = (flat != big).sum(dim=1).to(torch.int32)
        merged = torch.where(flat == big, torch.full_like(flat, -1), flat).to(torch.int32)
        return merged, counts
    flat = np.asarray(positions).reshape(n, -1).astype(np.int64)
    flat = np.where(flat < 0, big, flat)
    flat.sort(axis=1)
    dup = np.zeros_like(flat, dtype=bool)
    dup[:, 1:] = flat[:, 1:] == flat[:, :-1]
    flat = np.where(dup, big, flat)
    flat.sort(axis=1)
    counts = (flat != big).sum(axis=1).astype(np.int32)
    return np.where(flat == big, -1, flat).astype(np.int32), counts


class Selector:
    """pqkv's token selection behind SGLang's retrieve_topk signature.

    store: the Store holding the requests' sequences. per_head: False (the
    default) returns one list per request (the union over KV heads), True one
    per (request, KV head). The engine binds each request's pool index to its
    sequence when the request's prompt is stored (after finish_prefill) and
    unbinds it when the request ends.
    """

    def __init__(self, store: Store, per_head: bool = False) -> None:
        self.store = store
        self.per_head = per_head
        self._by_slot: Dict[int, Sequence] = {}

    def bind(self, req_pool_index: int, seq: Sequence) -> None:
        """Routes requests in pool slot `req_pool_index` to `seq`."""
        self._by_slot[int(req_pool_index)] = seq

    def unbind(self, req_pool_index: int) -> None:
        """Forgets slot `req_pool_index` (the request ended)."""
        self._by_slot.pop(int(req_pool_index), None)

    def sequence(self, req_pool_index: int) -> Sequence:
        """The sequence bound to `req_pool_index` (NotFoundError if none)."""
        try:
            return self._by_slot[int(req_pool_index)]
        except KeyError:
            raise NotFoundError(
                f"no sequence is bound to request pool slot {req_pool_index}: call "
                "Selector.bind(slot, sequence) after the request's prefill"
            ) from None

    def retrieve_topk(
        self,
        queries: Any,
        layer_id: int,
        req_pool_indices: Any,
        sparse_mask: Any,
        max_selected: Optional[int] = None,
        **kwargs: Any,
    ) -> Tuple[Any, Any]:
        """Selected token positions of this decode step, per request.

        queries [bs, q_heads, head_dim] (this step's queries of layer
        `layer_id`, after RoPE; each request's newest token already appended
        to that layer); req_pool_indices [bs] ints; sparse_mask [bs] bool:
        rows that select (others get no positions and length 0: attend them
        densely). max_selected: the per-head width (None: the largest
        Sequence.max_selected of the rows). Other keyword arguments of the
        engine (attn_metadata, ...) are accepted and ignored.

        Returns (positions, lengths) on the queries' device: per_head=False:
        [bs, kv_heads * max_selected] int32 ascending padded with -1, [bs]
        int32; per_head=True: [bs, kv_heads, max_selected], [bs, kv_heads].
        """
        slots = _to_host_list(req_pool_indices)
        mask = [bool(m) for m in _to_host_list(sparse_mask)]
        bs = queries.shape[0]
        if len(slots) != bs or len(mask) != bs:
            raise InvalidArgumentError(
                f"queries has {bs} rows, req_pool_indices {len(slots)}, sparse_mask {len(mask)}"
            )
        active = [i for i in range(bs) if mask[i]]
        seqs = [self.sequence(slots[i]) for i in active]
        if max_selected is None:
            max_selected = max([s.max_selected(layer_id) for s in seqs] or [0])
        kv = self.store.spec.num_kv_heads
        torch_mode = is_torch_tensor(queries)
        if torch_mode:
            import torch

            positions = torch.full(
                (bs, kv, max_selected), -1, dtype=torch.int32, device=queries.device
            )
            lengths = torch.zeros((bs, kv), dtype=torch.int32, device=queries.device)
        else:
            positions = np.full((bs, kv, max_selected), -1, dtype=np.int32)
            lengths = np.zeros((bs, kv), dtype=np.int32)
        if seqs:
            if len(active) == bs:
                q = queries
            elif torch_mode:
                q = queries[torch.tensor(active, device=queries.device)]
            else:
                q = np.ascontiguousarray(np.asarray(queries)[active])
            q = q.contiguous() if torch_mode else np.ascontiguousarray(q)
            p, n = self.store.select_batch(layer_id, seqs, q, max_selected=max_selected)
            positions[active] = p
            lengths[active] = n
        if self.per_head:
            return positions, lengths
        return merge_heads(positions, lengths)
