#!/usr/bin/env python3
"""pqkv quick start: store a long context, decode a few steps, compare with exact attention.

CPU only, numpy only. Opens an in-memory store, prefills keys and values with
the structure real post-RoPE keys have (a few outlier channels, a per-head
offset) or reads them from --keys FILE.npz, then decodes --steps steps: each
step appends one token per layer and attends with queries that look for a few
earlier tokens and favour recent ones. For every (step, layer) it prints

  recall   the share of exact attention's probability mass on the tokens pqkv
           attended (sink + window + top-K), beside that of as many tokens
           taken as sink + most recent ones; needs pqkv_select_batch
  error    |attend - attend_exact| / |attend_exact| of the attention outputs

and exits 1 when the mean recall or error misses its threshold.

  python3 examples/python/quickstart.py                 # synthetic context
  python3 examples/python/quickstart.py --keys kv.npz   # keys/values [layers, tokens, kv_heads, head_dim]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import pqkv


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    p.add_argument("--q-heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2)")
    p.add_argument("--head-dim", type=int, default=64, help="head_dim (default 64)")
    p.add_argument("--steps", type=int, default=4, help="decode steps (default 4)")
    p.add_argument("--budget", type=float, default=0.05,
                   help="window and top-K, each this share of the context (default 0.05)")
    p.add_argument("--sink", type=int, default=32, help="sink tokens (default 32)")
    p.add_argument("--keys", metavar="FILE.npz",
                   help="read 'keys' and 'values' [layers, tokens, kv_heads, head_dim] from FILE")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--min-recall", type=float, default=0.8,
                   help="fail when the mean recall is below this (default 0.8)")
    p.add_argument("--max-error", type=float, default=0.1,
                   help="fail when the mean relative output error is above this (default 0.1)")
    return p.parse_args()


def synthetic_kv(rng: np.random.Generator, layers: int, tokens: int, kv_heads: int, d: int):
    """Keys [layers, tokens, kv_heads, d] with 4 outlier channels and a per-head
    offset (as post-RoPE keys of real models have), and plain values."""
    keys = rng.standard_normal((layers, tokens, kv_heads, d)).astype(np.float32)
    outliers = rng.choice(d, size=4, replace=False)
    keys[..., outliers] = keys[..., outliers] * 4.0 + 6.0
    keys += rng.standard_normal((layers, 1, kv_heads, d)).astype(np.float32)
    values = rng.standard_normal((layers, tokens, kv_heads, d)).astype(np.float32)
    return keys, values


def decode_queries(rng, keys, q_heads: int, sink: int):
    """Queries [q_heads, d] of one layer that look for 4 earlier tokens per KV
    head (past the sink) and lean towards the last 16: attention concentrated
    on a few tokens, as in retrieval heads."""
    tokens, kv_heads, d = keys.shape
    group = q_heads // kv_heads
    q = np.empty((q_heads, d), np.float32)
    for h in range(kv_heads):
        hot = rng.choice(np.arange(sink, tokens - 16), size=4, replace=False)
        centred = keys[:, h, :] - keys[:, h, :].mean(axis=0)
        target = centred[hot].mean(axis=0) + 0.3 * centred[-16:].mean(axis=0)
        target *= 2.5 * np.sqrt(d) / (np.linalg.norm(target) + 1e-6)
        for g in range(group):
            q[h * group + g] = target + 0.1 * rng.standard_normal(d).astype(np.float32)
    return q


def softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def exact_probs(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Exact attention probabilities [q_heads, tokens] of q over keys [tokens, kv_heads, d]."""
    q_heads, d = q.shape
    group = q_heads // keys.shape[1]
    scores = np.stack([keys[:, h // group, :] @ q[h] for h in range(q_heads)]) / np.sqrt(d)
    return softmax_rows(scores)


def attention_recall(probs, positions, lengths, sink: int):
    """Mean over query heads of exact attention's mass on the positions pqkv
    attends (positions [kv_heads, max_selected], lengths [kv_heads]), and on
    as many tokens taken as sink + most recent ones (no top-K)."""
    q_heads, length = probs.shape
    group = q_heads // positions.shape[0]
    recall, base = [], []
    for h in range(q_heads):
        n = int(lengths[h // group])
        recall.append(probs[h, positions[h // group, :n]].sum())
        recent = max(n - sink, 0)
        base.append(probs[h, :sink].sum() + probs[h, length - recent :].sum())
    return float(np.mean(recall)), float(np.mean(base))


def main() -> int:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    if args.keys:
        data = np.load(args.keys)
        keys, values = data["keys"].astype(np.float32), data["values"].astype(np.float32)
        if keys.ndim != 4 or keys.shape != values.shape:
            print(f"{args.keys}: keys and values must both be [layers, tokens, kv_heads, head_dim]",
                  file=sys.stderr)
            return 2
        layers, tokens, kv_heads, d = keys.shape
        q_heads = kv_heads * max(1, args.q_heads // args.kv_heads)
    else:
        layers, kv_heads, d, q_heads = args.layers, args.kv_heads, args.head_dim, args.q_heads
        keys, values = synthetic_kv(rng, layers, args.tokens + args.steps, kv_heads, d)
        tokens = args.tokens
    if keys.shape[1] < tokens + args.steps:  # a file holds the prompt only: decode its last tokens
        tokens = keys.shape[1] - args.steps
    spec = pqkv.ModelSpec(layers, q_heads, kv_heads, d, pqkv.DType.F32)
    options = pqkv.SequenceOptions(sink=args.sink, window=args.budget, top_k=args.budget)
    can_select = pqkv.has_function("pqkv_select_batch")
    print(f"pqkv {pqkv.library_version() or '(version unknown)'} from {pqkv.library_path()}")
    print(f"geometry: {layers} layers, {q_heads} q heads, {kv_heads} KV heads, head_dim {d}; "
          f"prompt {tokens} tokens; budget sink {args.sink} + window {args.budget:.0%} "
          f"+ top-K {args.budget:.0%}")

    recalls, baselines, errors = [], [], []
    with pqkv.Store.open(spec, device="cpu") as store:
        seq = store.create_sequence("quickstart", options)
        t0 = time.perf_counter()
        for layer in range(layers):
            seq.append(layer, keys[layer, :tokens], values[layer, :tokens])
        seq.finish_prefill()
        print(f"prefill + index build: {(time.perf_counter() - t0) * 1e3:.0f} ms")
        for step in range(args.steps):
            length = tokens + step + 1
            for layer in range(layers):
                t = length - 1
                seq.append(layer, keys[layer, t : t + 1], values[layer, t : t + 1])
                q = decode_queries(rng, keys[layer, :length], q_heads, args.sink)
                line = f"step {step} layer {layer}:"
                if can_select:  # what this step will attend to, asked before attending
                    positions, lengths = store.select_batch(layer, [seq], q[None])
                    probs = exact_probs(q, keys[layer, :length])
                    recall, base = attention_recall(probs, positions[0], lengths[0], args.sink)
                    recalls.append(recall)
                    baselines.append(base)
                    line += (f" recall {recall:.3f} over {int(lengths[0].max())} of {length} "
                             f"tokens (sink + recent tokens alone: {base:.3f})")
                out = seq.attend(layer, q)
                ref = seq.attend_exact(layer, q)
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                errors.append(err)
                line += f" error {err:.4f}"
                print(line)

    mean_err = float(np.mean(errors))
    ok = mean_err <= args.max_error
    summary = f"mean output error {mean_err:.4f} (max {args.max_error})"
    if recalls:
        mean_recall = float(np.mean(recalls))
        ok = ok and mean_recall >= args.min_recall
        summary += f"; mean recall {mean_recall:.3f} (min {args.min_recall}), " \
                   f"sink + recent tokens alone {np.mean(baselines):.3f}"
    else:
        summary += "; recall skipped: this libpqkv has no pqkv_select_batch"
    print(("PASS: " if ok else "FAIL: ") + summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
