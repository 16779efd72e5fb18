#!/usr/bin/env python3
"""The torch reference for pqkv's prefill benchmarks (docs/benchmarks.md).

Two timings on one GPU, bf16, attention through
torch.nn.functional.scaled_dot_product_attention (causal, GQA without
repeating K/V where the flash backend takes enable_gqa):

  attention   one layer's attention alone: q [1, q_heads, T, d], k and v
              [1, kv_heads, T, d], as `pqkv micro --benchmark_filter=Prefill`
              times pqkv's kernel.
  prefill     time to first token of the checkpoint in --model (Llama layout,
              as `pqkv random-model` writes it): embedding, per layer RMSNorm,
              q/k/v projections, RoPE, attention, o_proj, SwiGLU MLP, then the
              final norm and the logits of the last position, as
              `pqkv generate --no-store` computes it.

Times are CUDA-synchronized wall clock: the first run (cold, as pqkv generate
runs once) and the median of --repeats warm runs.

usage: prefill_reference.py --model DIR --lengths 8192,32768
                            [--attention-lengths 8192,32768,131072] [--json OUT]
"""
import argparse
import glob
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def sdpa_flash(q, k, v):
    """Causal attention on the flash backend; GQA natively where it is supported."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), "flash gqa"
        except RuntimeError:
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), "flash repeated kv"


def timed(fn, repeats):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm)


class Llama:
    def __init__(self, folder):
        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)
        self.layers = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads", self.heads)
        self.d = c.get("head_dim") or c["hidden_size"] // self.heads
        self.eps = c.get("rms_norm_eps", 1e-5)
        self.theta = c.get("rope_theta", 10000.0)
        self.w = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            for name, t in load_file(path, device="cuda").items():
                self.w[name] = t.to(torch.bfloat16)
        self.lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        self.backend = None

    def norm(self, x, weight):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * weight

    def rope(self, T):
        inv = 1.0 / (self.theta ** (torch.arange(0, self.d, 2, device="cuda").float() / self.d))
        f = torch.outer(torch.arange(T, device="cuda").float(), inv)
        f = torch.cat((f, f), -1)
        return f.cos().to(torch.bfloat16), f.sin().to(torch.bfloat16)

    def rotate(self, x, cos, sin):
        h = self.d // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

    @torch.no_grad()
    def first_token(self, ids):
        T = ids.shape[0]
        cos, sin = self.rope(T)
        x = self.w["model.embed_tokens.weight"][ids]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            h = self.norm(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(T, self.heads, self.d).transpose(0, 1)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(T, self.kv_heads, self.d).transpose(0, 1)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(T, self.kv_heads, self.d).transpose(0, 1)
            q = self.rotate(q, cos, sin)
            k = self.rotate(k, cos, sin)
            o, self.backend = sdpa_flash(q[None], k[None], v[None].contiguous())
            o = o[0].transpose(0, 1).reshape(T, self.heads * self.d)
            x = x + o @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, self.w[p + "post_attention_layernorm.weight"])
            g = F.silu(h @ self.w[p + "mlp.gate_proj.weight"].T) * (h @ self.w[p + "mlp.up_proj.weight"].T)
            x = x + g @ self.w[p + "mlp.down_proj.weight"].T
        h = self.norm(x[-1:], self.w["model.norm.weight"])
        return int((h @ self.lm_head.T).argmax())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (config.json, *.safetensors)")
    ap.add_argument("--lengths", default="8192,32768", help="prompt lengths for the prefill timing")
    ap.add_argument("--attention-lengths", default="8192,32768,131072",
                    help="lengths for the attention-alone timing (Llama-3.1-8B layer: 32/8 heads, d 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "attention": [], "prefill": []}

    for T in [int(x) for x in args.attention_lengths.split(",") if x]:
        q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)
        backend = sdpa_flash(q, k, v)[1]
        cold, warm = timed(lambda: sdpa_flash(q, k, v), args.repeats)
        tflops = 4 * T * T / 2 * 32 * 128 / warm * 1e-12
        out["attention"].append({"tokens": T, "ms": warm * 1e3, "tflops": tflops, "backend": backend})
        print(f"torch attention T={T}: {warm * 1e3:.3f} ms ({tflops:.1f} TFLOP/s, {backend})", flush=True)
        del q, k, v

    if args.model:
        model = Llama(args.model)
        gen = torch.Generator().manual_seed(0)
        for T in [int(x) for x in args.lengths.split(",") if x]:
            ids = torch.randint(0, model.lm_head.shape[0], (T,), generator=gen).cuda()
            cold, warm = timed(lambda: model.first_token(ids), args.repeats)
            out["prefill"].append({"tokens": T, "cold_ms": cold * 1e3, "warm_ms": warm * 1e3,
                                   "layers": model.layers, "backend": model.backend})
            print(f"torch prefill T={T} layers={model.layers}: cold {cold * 1e3:.1f} ms, "
                  f"warm {warm * 1e3:.1f} ms ({model.backend})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
