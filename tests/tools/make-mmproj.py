#!/usr/bin/env python3
"""Writes a small vision projector (mmproj) GGUF for a llama-architecture language model.

No small vision model ships in a package the tests can install, so they pair the default
language model with this projector: libmtmd's "mlp" (LLaVA-1.5) type, with seeded random
weights in exactly the tensor layout llama.cpp's clip loader reads (docs/vision-plan.md,
section 3). It proves the plumbing, not understanding: an image becomes IMAGE/PATCH squared
embedding tokens, deterministically, and a different image gives different embeddings.

Shapes: image 32x32, patch 8 (16 image tokens), vision width 64 (4 heads), FFN 128 (not 64:
clip's loader swaps up/down when they look alike), 2 blocks (the llava graph runs n-1 of
them), projecting to the language model's embedding width read from BASE.

usage: make-mmproj.py BASE.gguf OUT.gguf [--seed 1] [--image-size 32] [--patch 8] [--width W]
"""
import argparse

import gguf
import gguf_file
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--width", type=int, default=0, help="output width (default: BASE's embedding width)")
    args = ap.parse_args()

    base = gguf.GGUFReader(args.base)
    arch = bytes(base.fields["general.architecture"].parts[-1]).decode()
    text_width = int(base.fields[f"{arch}.embedding_length"].parts[-1][0])
    out_width = args.width or text_width
    size, patch = args.image_size, args.patch
    if size % patch:
        raise SystemExit("image size must be a multiple of the patch size")
    n_patches = (size // patch) ** 2
    e, heads, ff, blocks = 64, 4, 128, 2

    w = gguf.GGUFWriter(args.out, "clip")
    w.add_string("general.name", "hearth test projector")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    for k, v in {
        "embedding_length": e,
        "attention.head_count": heads,
        "feed_forward_length": ff,
        "block_count": blocks,
        "projection_dim": out_width,
        "image_size": size,
        "patch_size": patch,
    }.items():
        w.add_uint32(f"clip.vision.{k}", v)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_bool("clip.use_gelu", True)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    rng = np.random.default_rng(args.seed)

    def t(*shape: int, scale: float = 0.02) -> np.ndarray:
        # numpy shape = the reverse of ggml's ne (the torch layout).
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # Patch embedding strong enough that pixels move the output, not only the position rows.
    w.add_tensor("v.patch_embd.weight", t(e, 3, patch, patch, scale=0.2))
    w.add_tensor("v.patch_embd.bias", t(e))
    w.add_tensor("v.position_embd.weight", t(n_patches, e))
    for i in range(blocks):
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"v.blk.{i}.{n}.weight", t(e, e, scale=0.1))
            w.add_tensor(f"v.blk.{i}.{n}.bias", t(e))
        for n in ("ln1", "ln2"):
            w.add_tensor(f"v.blk.{i}.{n}.weight", np.ones(e, np.float32))
            w.add_tensor(f"v.blk.{i}.{n}.bias", t(e))
        w.add_tensor(f"v.blk.{i}.ffn_up.weight", t(ff, e, scale=0.1))
        w.add_tensor(f"v.blk.{i}.ffn_up.bias", t(ff))
        w.add_tensor(f"v.blk.{i}.ffn_down.weight", t(e, ff, scale=0.1))
        w.add_tensor(f"v.blk.{i}.ffn_down.bias", t(e))
    hidden = 128
    w.add_tensor("mm.0.weight", t(hidden, e, scale=0.2))
    w.add_tensor("mm.0.bias", t(hidden))
    w.add_tensor("mm.2.weight", t(out_width, hidden, scale=0.1))
    w.add_tensor("mm.2.bias", t(out_width))
    gguf_file.write(w)


if __name__ == "__main__":
    main()
