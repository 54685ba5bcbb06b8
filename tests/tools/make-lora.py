#!/usr/bin/env python3
"""Writes a small LoRA adapter GGUF for a llama-architecture base model, for the tests.

Uses gguf-py (the GGUF library maintained in the llama.cpp repository) to read the base
model's shapes and to write the adapter. The adapter touches every layer's attn_q weight with
rank-`rank` matrices drawn from a seeded normal distribution, so applying it changes the
model's output deterministically; `--zero` writes B = 0 (an adapter that changes nothing).

usage: make-lora.py BASE.gguf OUT.gguf [--rank 4] [--seed 1] [--scale 0.5] [--zero]
"""
import argparse

import gguf
import gguf_file
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--zero", action="store_true")
    args = ap.parse_args()

    base = gguf.GGUFReader(args.base)
    arch = bytes(base.fields["general.architecture"].parts[-1]).decode()
    targets = [t for t in base.tensors if t.name.endswith(".attn_q.weight")]
    if not targets:
        raise SystemExit(f"{args.base}: no attn_q weights")

    w = gguf.GGUFWriter(args.out, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(args.rank))
    rng = np.random.default_rng(args.seed)
    for t in targets:
        n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ggml order: ne0 = input width
        a = (rng.standard_normal((args.rank, n_in)) * args.scale / np.sqrt(n_in)).astype(np.float32)
        b = np.zeros((n_out, args.rank), np.float32) if args.zero else (
            rng.standard_normal((n_out, args.rank)) * args.scale).astype(np.float32)
        w.add_tensor(t.name + ".lora_a", a)
        w.add_tensor(t.name + ".lora_b", b)
    gguf_file.write(w)


if __name__ == "__main__":
    main()
