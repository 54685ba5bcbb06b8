#!/usr/bin/env python3
"""Writes a phone-sized llama-architecture GGUF with seeded random weights, for the benchmark.

Speed at 0.5-3B is set by the bytes of weights read per token, not by what they say, so the
weights are drawn directly in their quantized form (random 4- or 8-bit codes under small
fp16 block scales, as Q4_0 / Q8_0 lay them out): the file has the real memory traffic of a
model of that size, is written at disk speed, and computes finite activations (every layer
is RMS-normalised). The tokenizer and chat template are copied from a real model (the
default one), so the file loads and serves like any other; its text is meaningless.

Shapes follow Qwen2.5's 0.5B, 1.5B and 3B (grouped-query attention, SwiGLU, tied
embeddings) with the tokenizer's vocabulary.

usage: make-phone-model.py TOKENIZER.gguf OUT.gguf --size 1.5b --type q4_0 [--seed 1]
"""
import argparse

import gguf
import gguf_file
import numpy as np

# n_embd, n_layer, n_head, n_head_kv, n_ff
SIZES = {
    # Not a phone size: small enough for tests of kernels that depend on the weights' type.
    "tiny": (256, 2, 4, 2, 768),
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
    "3b": (2048, 36, 16, 2, 11008),
}
TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def copy_tokenizer(src: gguf.GGUFReader, w: gguf.GGUFWriter) -> int:
    """Copies every tokenizer.* field; returns the vocabulary size."""
    n_vocab = 0
    for name, field in src.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        w.add_key_value(name, value, main, sub_type=sub)
    if n_vocab == 0:
        raise SystemExit("the tokenizer model has no tokenizer.ggml.tokens")
    return n_vocab


def quantized(rng: np.random.Generator, qtype: gguf.GGMLQuantizationType, n_out: int, n_in: int) -> np.ndarray:
    """Random weights of shape (n_out, n_in) in `qtype`'s block layout, as raw bytes."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = n_out * (n_in // block)
    # Block scale: weights of magnitude ~1/sqrt(n_in) keep every dot product of order 1.
    codes_max = 8 if qtype == gguf.GGMLQuantizationType.Q4_0 else 128
    scale = np.full(blocks, 1.0 / (np.sqrt(n_in) * codes_max), np.float16)
    raw = np.empty((blocks, size), np.uint8)
    raw[:, :2] = scale.view(np.uint8).reshape(blocks, 2)
    raw[:, 2:] = rng.integers(0, 256, (blocks, size - 2), dtype=np.uint8)
    return raw.reshape(n_out, (n_in // block) * size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer")
    ap.add_argument("out")
    ap.add_argument("--size", choices=SIZES, required=True)
    ap.add_argument("--type", choices=TYPES, required=True)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    n_embd, n_layer, n_head, n_head_kv, n_ff = SIZES[args.size]
    qtype = TYPES[args.type]
    head_dim = n_embd // n_head
    rng = np.random.default_rng(args.seed)

    arch = "llama"
    w = gguf.GGUFWriter(args.out, arch)
    w.add_name(f"hearth-bench random {args.size} {args.type}")
    n_vocab = copy_tokenizer(gguf.GGUFReader(args.tokenizer), w)
    w.add_vocab_size(n_vocab)
    w.add_context_length(32768)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(FILE_TYPES[args.type])

    def matrix(name: str, n_out: int, n_in: int) -> None:
        w.add_tensor(name, quantized(rng, qtype, n_out, n_in), raw_dtype=qtype)

    ones = np.ones(n_embd, np.float32)
    matrix("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", ones)
    kv = n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        matrix(p + "attn_q.weight", n_embd, n_embd)
        matrix(p + "attn_k.weight", kv, n_embd)
        matrix(p + "attn_v.weight", kv, n_embd)
        matrix(p + "attn_output.weight", n_embd, n_embd)
        w.add_tensor(p + "ffn_norm.weight", ones)
        matrix(p + "ffn_gate.weight", n_ff, n_embd)
        matrix(p + "ffn_up.weight", n_ff, n_embd)
        matrix(p + "ffn_down.weight", n_embd, n_ff)
    gguf_file.write(w)


if __name__ == "__main__":
    main()
