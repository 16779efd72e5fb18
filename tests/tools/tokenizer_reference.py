#!/usr/bin/env python3
"""Compares pqkv's tokenizers with the reference implementations.

Trains small tokenizers on a haystack text with Hugging Face `tokenizers`
(byte-level BPE, as Llama 3 and GPT-2 ship them) and `sentencepiece` (BPE and
unigram with byte fallback, as Llama 2 and Mistral ship them), encodes sample
strings with the Python libraries and with `pqkv tokenize`, and requires the
same ids. Then puts a tiny random checkpoint beside each tokenizer and runs
`pqkv generate --prompt` (its echo of the prompt must be the prompt: the
decoder) and `pqkv needle` (prompts of the requested length) on it. Exits 0 when every sample matches, 1 otherwise, 77 (skipped) without
the haystack text.

Usage: tokenizer_reference.py --pqkv PATH --haystack TEXT_FILE
"""
import argparse
import array
import json
import os
import random
import pathlib
import subprocess
import sys
import tempfile

# Llama 3's pre-tokenizer regex.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]

# Strings that exercise what tokenizers get wrong: spaces, digits, contractions,
# punctuation runs, non-ASCII letters, emoji (bytes outside the vocabulary),
# special tokens inside text, tabs.
SAMPLES = [
    "Hello, world!",
    "  two leading spaces and trailing   ",
    "numbers 1234567 and 3.14159 and 2026-11-30",
    "I'm sure they'll say we've done it, DON'T they?",
    "naïve café, Ærøskøbing, Straße",
    "Москва и Санкт-Петербург",
    "東京は日本の首都です。",
    "emoji 🙂👍🏽 and symbols ∑∫√ ≤ ≥",
    "tabs\tin\tthe\tmiddle",
    "<|begin_of_text|>special tokens<|end_of_text|> inside text",
    "!!!??? ... --- ***",
    "x",
    "",
]


def ensure_packages(repo):
    try:
        import sentencepiece  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError:
        script = repo / "scripts" / "install-test-deps.sh"
        subprocess.run([str(script)], check=True, env={**os.environ, "PYTHON": sys.executable})
        import site
        import importlib

        site.addsitedir(site.getusersitepackages())
        importlib.invalidate_caches()


def training_lines(haystack, limit_bytes=300_000):
    text = haystack.read_text(encoding="utf-8", errors="replace")[:limit_bytes]
    return [line for line in text.splitlines() if line.strip()]


def samples_from(lines):
    # Real text the tokenizers were not trained on, plus the hand-written cases.
    held_out = [line[:300] for line in lines[-400::8]]
    return SAMPLES + held_out


def train_hf(folder, lines, gpt2_style):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if gpt2_style:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return (
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        None,
        tok.token_to_id(SPECIALS[0]),
        tok.token_to_id(SPECIALS[1]),
        tok.get_vocab_size(),
    )


def train_sp(folder, lines, model_type):
    import sentencepiece as spm

    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=800,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    (folder / "tokenizer.vocab").unlink()

    def equivalent(want, got):
        # A unigram model can score two segmentations the same; library
        # versions break such ties differently. Both are right when they spell
        # the same text with the same total score.
        return sp.decode(want) == sp.decode(got) and abs(
            sum(sp.get_score(i) for i in want) - sum(sp.get_score(i) for i in got)
        ) < 1e-4

    return lambda text: sp.encode(text), equivalent, sp.bos_id(), sp.eos_id(), sp.get_piece_size()


def write_tiny_checkpoint(folder, vocab_size, bos_id, eos_id):
    """A random one-layer Llama beside the tokenizer, so that `generate` and
    `needle` run on the folder as on a real checkpoint."""
    hidden, inter, heads, kv_heads, head_dim = 32, 48, 4, 2, 8
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {
        "model.embed_tokens.weight": [vocab_size, hidden],
        "model.layers.0.input_layernorm.weight": [hidden],
        "model.layers.0.self_attn.q_proj.weight": [heads * head_dim, hidden],
        "model.layers.0.self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
        "model.layers.0.self_attn.v_proj.weight": [kv_heads * head_dim, hidden],
        "model.layers.0.self_attn.o_proj.weight": [hidden, heads * head_dim],
        "model.layers.0.post_attention_layernorm.weight": [hidden],
        "model.layers.0.mlp.gate_proj.weight": [inter, hidden],
        "model.layers.0.mlp.up_proj.weight": [inter, hidden],
        "model.layers.0.mlp.down_proj.weight": [hidden, inter],
        "model.norm.weight": [hidden],
        "lm_head.weight": [vocab_size, hidden],
    }
    rng = random.Random(7)
    header, blobs, offset = {}, [], 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        values = array.array("f", (rng.gauss(0.0, 0.2) for _ in range(n)))
        if name.endswith("norm.weight"):
            values = array.array("f", [1.0] * n)
        data = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def check_commands(pqkv, folder, haystack, scratch):
    """`generate --prompt` echoes the prompt through the tokenizer's decoder,
    and `needle` builds prompts of the requested length. Returns the failures."""
    failures = []
    for prompt in ["Hello, world!", "naïve café, 東京 and 🙂", "It's 2026: 12345 tokens."]:
        run = subprocess.run(
            [pqkv, "generate", "--model", str(folder), "--prompt", prompt, "--max-new", "3"],
            capture_output=True,
        )
        out = run.stdout.decode("utf-8", errors="replace")
        if run.returncode != 0 or not out.startswith(prompt):
            failures.append(f"generate --prompt {prompt!r}: exit {run.returncode}, stdout {out!r}, "
                            f"stderr {run.stderr.decode(errors='replace')!r}")
    hay = scratch / "haystack.txt"
    hay.write_text(haystack.read_text(encoding="utf-8", errors="replace")[:50_000], encoding="utf-8")
    run = subprocess.run(
        [pqkv, "needle", "--model", str(folder), "--haystack", str(hay), "--lengths", "300",
         "--depths", "0.5", "--max-new", "2", "--sink", "4"],
        capture_output=True,
        text=True,
        errors="replace",
    )
    if run.returncode != 0 or "length 300 (300 tokens)" not in run.stderr:
        failures.append(f"needle: exit {run.returncode}, stderr {run.stderr!r}")
    return failures


def pqkv_ids(pqkv, folder, samples, scratch):
    path = scratch / "samples.txt"
    path.write_text("\n".join(samples) + "\n", encoding="utf-8")
    out = subprocess.run(
        [pqkv, "tokenize", "--model", str(folder), "--file", str(path), "--lines"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = out.split("\n")[: len(samples)]
    return [[int(x) for x in row.split(",")] if row else [] for row in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pqkv", required=True)
    parser.add_argument("--haystack", required=True, type=pathlib.Path)
    args = parser.parse_args()
    # The same override the C++ tests read (tests/test_util.h): the shared
    # fixtures where PQKV_SHARED_DIR names them.
    shared = os.environ.get("PQKV_SHARED_DIR")
    if shared:
        args.haystack = pathlib.Path(shared) / "data" / "haystack" / args.haystack.name
    if not args.haystack.is_file():
        print(f"skipped: no haystack text at {args.haystack}")
        return 77
    repo = pathlib.Path(__file__).resolve().parents[2]
    ensure_packages(repo)

    lines = training_lines(args.haystack)
    samples = samples_from(lines)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="pqkv_tokenizers_") as tmp:
        scratch = pathlib.Path(tmp)
        cases = {
            "hf byte-level BPE, Llama 3 regex, ignore_merges": lambda d: train_hf(d, lines, False),
            "hf byte-level BPE, GPT-2 regex": lambda d: train_hf(d, lines, True),
            "sentencepiece BPE, byte fallback": lambda d: train_sp(d, lines, "bpe"),
            "sentencepiece unigram, byte fallback": lambda d: train_sp(d, lines, "unigram"),
        }
        for i, (name, train) in enumerate(cases.items()):
            folder = scratch / f"tok{i}"
            reference, equivalent, bos, eos, vocab = train(folder)
            got = pqkv_ids(args.pqkv, folder, samples, scratch)
            bad = []
            ties = 0
            for s, g in zip(samples, got):
                want = reference(s)
                if want == g:
                    continue
                if equivalent is not None and equivalent(want, g):
                    ties += 1
                    continue
                bad.append((s, want, g))
            tied = f" ({ties} an equally scored segmentation)" if ties else ""
            print(f"{name}: {len(samples) - len(bad)}/{len(samples)} samples match{tied}")
            for s, want, g in bad[:5]:
                print(f"  MISMATCH {s!r}\n    reference {want}\n    pqkv      {g}")
            failures += len(bad)
            write_tiny_checkpoint(folder, vocab, bos, eos)
            command_failures = check_commands(args.pqkv, folder, args.haystack, scratch)
            print(f"{name}: generate --prompt and needle " +
                  ("ok" if not command_failures else "FAILED"))
            for f in command_failures:
                print(f"  {f}")
            failures += len(command_failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
