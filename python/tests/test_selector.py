"""The selector contract: select_batch returns what attend reads; retrieve_topk's shapes."""

import numpy as np
import pytest

import pqkv
from pqkv.selector import Selector, merge_heads
from support import keys_values, need

SINK, WINDOW, TOP_K = 4, 8, 8


def make_sequences(store, spec, rng, lengths):
    """Sequences with prompts of `lengths` plus one decode token in every layer;
    returns them and their keys/values per layer ([tokens, kv_heads, head_dim])."""
    opts = pqkv.SequenceOptions(sink=SINK, window=WINDOW, top_k=TOP_K, pq_bits=4)
    seqs, data = [], []
    for i, n in enumerate(lengths):
        seq = store.create_sequence(f"s{i}", opts)
        kv = [keys_values(rng, n + 1, spec) for _ in range(spec.num_layers)]
        for layer, (k, v) in enumerate(kv):
            seq.append(layer, k[:n], v[:n])
        seq.finish_prefill()
        for layer, (k, v) in enumerate(kv):
            seq.append(layer, k[n:], v[n:])
        seqs.append(seq)
        data.append(kv)
    return seqs, data


def attention_over(q, k, v, picks, group):
    """Exact attention of q [q_heads, d] over positions picks[kv_head] of k, v."""
    out = np.empty_like(q)
    for h in range(q.shape[0]):
        rows = picks[h // group]
        s = k[rows, h // group, :] @ q[h] / np.sqrt(q.shape[1])
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[rows, h // group, :]
    return out


def test_select_batch_is_what_attend_reads(store, spec, rng):
    need("pqkv_select_batch")
    need("pqkv_sequence_max_selected")
    lengths = [200, 97, 320]
    seqs, data = make_sequences(store, spec, rng, lengths)
    layer = 1
    q = rng.standard_normal((len(seqs), spec.num_q_heads, spec.head_dim)).astype(np.float32)
    positions, counts = store.select_batch(layer, seqs, q)
    width = max(s.max_selected(layer) for s in seqs)
    assert positions.shape == (len(seqs), spec.num_kv_heads, width)
    assert positions.dtype == np.int32 and counts.shape == (len(seqs), spec.num_kv_heads)
    for i, seq in enumerate(seqs):
        total = lengths[i] + 1
        picks = []
        for h in range(spec.num_kv_heads):
            n = int(counts[i, h])
            row = positions[i, h]
            assert 0 < n <= width and (row[n:] == -1).all()
            chosen = row[:n]
            assert len(set(chosen.tolist())) == n and chosen.min() >= 0 and chosen.max() < total
            assert set(range(SINK)) <= set(chosen.tolist()), "sink tokens missing"
            assert total - 1 in chosen, "the newest token is missing"
            assert set(range(total - WINDOW, total)) <= set(chosen.tolist()), "window missing"
            picks.append(np.sort(chosen))
        k, v = data[i][layer]
        want = attention_over(q[i], k, v, picks, spec.group_size)
        got = seq.attend(layer, q[i])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_retrieve_topk_shapes_and_mask(store, spec, rng):
    need("pqkv_select_batch")
    need("pqkv_sequence_max_selected")
    seqs, _ = make_sequences(store, spec, rng, [150, 90, 260])
    layer = 0
    sel, sel_per_head = Selector(store), Selector(store, per_head=True)
    for slot, seq in zip((7, 3, 11), seqs):
        sel.bind(slot, seq)
        sel_per_head.bind(slot, seq)
    q = rng.standard_normal((3, spec.num_q_heads, spec.head_dim)).astype(np.float32)
    mask = np.array([True, False, True])
    positions, lengths = sel.retrieve_topk(q, layer, np.array([7, 3, 11]), mask)
    assert positions.dtype == np.int32 and lengths.dtype == np.int32
    assert positions.ndim == 2 and lengths.shape == (3,)
    assert lengths[1] == 0 and (positions[1] == -1).all()
    per_head, per_head_len = sel_per_head.retrieve_topk(q, layer, [7, 3, 11], mask)
    assert per_head.shape[:2] == (3, spec.num_kv_heads) and per_head_len.shape == (3, 2)
    for i in (0, 2):
        n = int(lengths[i])
        row = positions[i, :n]
        assert (np.diff(row) > 0).all() and (positions[i, n:] == -1).all()
        union = set()
        for h in range(spec.num_kv_heads):
            union |= set(per_head[i, h, : per_head_len[i, h]].tolist())
        assert set(row.tolist()) == union
    with pytest.raises(pqkv.NotFoundError, match="bind"):
        sel.retrieve_topk(q, layer, [7, 4, 11], [True, True, True])


def test_merge_heads_numpy_and_torch():
    p = np.array([[[5, 1, 9, -1], [1, 2, -1, -1]], [[-1, -1, -1, -1], [0, 3, 3, -1]]], np.int32)
    merged, counts = merge_heads(p, None)
    assert counts.tolist() == [4, 2]
    assert merged[0, :4].tolist() == [1, 2, 5, 9] and (merged[0, 4:] == -1).all()
    assert merged[1, :2].tolist() == [0, 3] and (merged[1, 2:] == -1).all()
    torch = pytest.importorskip("torch")
    tm, tc = merge_heads(torch.from_numpy(p), None)
    assert tm.dtype == torch.int32 and tm.tolist() == merged.tolist()
    assert tc.tolist() == counts.tolist()


def test_oracle_selection_picks_the_exact_top_k(store, spec, rng):
    need("pqkv_select_batch")
    need("pqkv_sequence_max_selected")
    n, layer = 240, 1
    opts = pqkv.SequenceOptions(
        sink=SINK,
        window=WINDOW,
        top_k=TOP_K,
        selection="oracle",
    )
    seq = store.create_sequence("oracle", opts)
    kv = [keys_values(rng, n, spec) for _ in range(spec.num_layers)]
    for lay, (k, v) in enumerate(kv):
        seq.append(lay, k, v)
    seq.finish_prefill()
    q = rng.standard_normal((1, spec.num_q_heads, spec.head_dim)).astype(np.float32)
    positions, counts = store.select_batch(layer, [seq], q)
    k = kv[layer][0]
    group = spec.group_size
    for h in range(spec.num_kv_heads):
        chosen = set(positions[0, h, : int(counts[0, h])].tolist())
        middle = np.arange(SINK, n - WINDOW)
        # PQCache's GQA aggregation: each query head's softmax over the
        # searched middle, summed over the group.
        logits = k[middle, h, :] @ q[0, h * group : (h + 1) * group].T / np.sqrt(spec.head_dim)
        probs = np.exp(logits - logits.max(axis=0))
        scores = (probs / probs.sum(axis=0)).sum(axis=1)
        want = set(middle[np.argsort(-scores)[:TOP_K]].tolist())
        assert chosen - set(range(SINK)) - set(range(n - WINDOW, n)) == want


def test_selection_names(store):
    for name in ("int4", "int8", "pq", "oracle", "pq+int8:4"):
        store.create_sequence(name, pqkv.SequenceOptions(selection=name))
    with pytest.raises(pqkv.InvalidArgumentError, match="int5"):
        store.create_sequence("bad", pqkv.SequenceOptions(selection="int5"))
