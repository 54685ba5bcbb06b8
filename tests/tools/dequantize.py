#!/usr/bin/env python3
"""Writes a copy of a GGUF model with every tensor dequantized to F32, for the GPU tests.

The same weights without quantization: a backend that multiplies them in 32-bit floats
differs from the CPU's only in its order of summation, which is what tests/tests/gpu.rs
compares. Uses gguf-py (the GGUF library maintained in the llama.cpp repository) to read
the model, dequantize its tensors and write the copy; every metadata key is copied except
the file type, which becomes "all F32".

usage: dequantize.py MODEL.gguf OUT.gguf
"""
import argparse

import gguf
import gguf_file
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    args = ap.parse_args()

    src = gguf.GGUFReader(args.model)
    arch = src.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(args.out, arch)
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), field.types[0], sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in src.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # ggml lists dimensions innermost first; numpy outermost first.
        w.add_tensor(t.name, values.reshape([int(n) for n in reversed(t.shape)]))
    gguf_file.write(w)


if __name__ == "__main__":
    main()
