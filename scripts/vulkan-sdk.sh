#!/usr/bin/env bash
# A VULKAN_SDK directory for building ggml-vulkan on Debian 12, in target/vulkan-sdk.
#
# This llama.cpp's ggml-vulkan uses Vulkan-Hpp of 1.3.268 or later (VK_EXT_layer_settings:
# vk::LayerSettingEXT); bookworm ships 1.3.239 and bookworm-backports no newer headers. The
# headers are header-only and loader-independent (ggml loads every entry point through
# vkGetInstanceProcAddr and checks the extension first), so this takes them from Debian 13's
# libvulkan-dev package (checked against the pinned SHA-256), unpacked, not installed: the
# system keeps bookworm's loader, which lib/ links to. The headers are the same in every
# architecture's package, so amd64's (whose checksum is pinned) serves every host. Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SDK="$ROOT/target/vulkan-sdk"
VERSION=1.4.309.0-1
DEB="libvulkan-dev_${VERSION}_amd64.deb"
SHA256=8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a
URL="http://deb.debian.org/debian/pool/main/v/vulkan-loader/$DEB"

if [ -f "$SDK/version" ] && [ "$(cat "$SDK/version")" = "$VERSION" ]; then
    echo "vulkan-sdk: headers $VERSION present in $SDK"
    exit 0
fi
loader="$(ls /usr/lib/*/libvulkan.so 2>/dev/null | head -n1 || true)"
if [ -z "$loader" ]; then
    echo "vulkan-sdk: no libvulkan.so (install libvulkan-dev: scripts/setup-deps.sh)" >&2
    exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "vulkan-sdk: fetching $DEB"
curl -fsSL --retry 3 -o "$tmp/$DEB" "$URL"
echo "$SHA256  $tmp/$DEB" | sha256sum -c --quiet -
dpkg-deb -x "$tmp/$DEB" "$tmp/x"
rm -rf "$SDK"
mkdir -p "$SDK/lib"
cp -r "$tmp/x/usr/include" "$SDK/include"
# The loader is bookworm's; FindVulkan and llama-cpp-sys-2 look for it under $VULKAN_SDK/lib.
ln -s "$loader" "$SDK/lib/libvulkan.so"
echo "$VERSION" > "$SDK/version"
echo "vulkan-sdk: Vulkan headers $VERSION in $SDK"
