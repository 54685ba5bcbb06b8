#!/usr/bin/env bash
# Builds the GLib example against the XML: gdbus-codegen makes the proxies, cc links GIO.
#   clients/glib/build.sh OUTDIR   ->  OUTDIR/hearth-stream (and the generated code, docs)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:?usage: build.sh OUTDIR}"
mkdir -p "$OUT"
XML="$HERE/../../dbus/data/org.hearth.Hearth1.xml"
(cd "$OUT" && gdbus-codegen --interface-prefix org.hearth. --c-namespace Hearth \
    --c-generate-autocleanup all --generate-c-code hearth-generated --generate-docbook doc "$XML")
# shellcheck disable=SC2046 # pkg-config's flags are words
cc -std=c11 -Wall -Wextra -Werror -Wno-unused-parameter -O2 -I"$OUT" -I"$HERE" \
    -o "$OUT/hearth-stream" "$HERE/hearth-stream.c" "$HERE/hearth-error.c" "$OUT/hearth-generated.c" \
    $(pkg-config --cflags --libs gio-2.0 gio-unix-2.0)
