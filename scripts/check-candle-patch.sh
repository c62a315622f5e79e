#!/usr/bin/env bash
# Checks that vendor/candle-core/src is candle-core 0.11.1 from crates.io plus
# vendor/candle-core/locograph.patch, nothing else: fetches the released crate into a scratch
# project (cargo's registry cache), applies the patch to a copy and compares the trees.
#
#   scripts/check-candle-patch.sh          # prints "vendored candle-core = 0.11.1 + locograph.patch"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/fetch/src"
printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncandle-core = "=0.11.1"\n' \
    > "$tmp/fetch/Cargo.toml"
: > "$tmp/fetch/src/lib.rs"
(cd "$tmp/fetch" && cargo fetch --quiet)
released="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 | head -n 1)"
cp -r "$released/src" "$tmp/src"
(cd "$tmp" && patch -p1 --quiet < "$root/vendor/candle-core/locograph.patch")
diff -r "$tmp/src" "$root/vendor/candle-core/src"
echo "vendored candle-core = 0.11.1 + locograph.patch"
