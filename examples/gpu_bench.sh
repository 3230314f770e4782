#!/usr/bin/env bash
# The speed figures of a GPU, in one go: the methods eager and compiled (ViT-B-16), ResNet
# convolutions with and without channels-last (RN50), bf16 against fp32, and the whole
# pipeline over a folder of photos. Every figure is a ratio to the bare forward pass of the
# same run; the JSON files hold the rows.
#
#   bash examples/gpu_bench.sh [OUT]          (OUT: gpu-bench)
#
# DEVICE (cuda), BATCH (64), REPEATS (5), PHOTOS (1024), CLIPVIZ (clipviz) and PYTHON (the
# python beside $CLIPVIZ) change it.
set -euo pipefail
OUT=${1:-gpu-bench}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-64}
REPEATS=${REPEATS:-5}
PHOTOS=${PHOTOS:-1024}
CLIPVIZ=${CLIPVIZ:-clipviz}
PYTHON=${PYTHON:-$(dirname "$(command -v "$CLIPVIZ")")/python}
HERE=$(dirname "$0")
mkdir -p "$OUT"
bench() {  # NAME ARGS…: one benchmark, its table on stdout and its rows in OUT/NAME.json
  local name=$1
  shift
  echo "== $name: clipviz bench $*"
  "$CLIPVIZ" bench --pretrained random --device "$DEVICE" -b "$BATCH" --repeats "$REPEATS" \
    --json "$OUT/$name.json" "$@"
}
methods=(-m itsm -m surgery -m maskclip -m gradcam -m legrad -m gae --prompts 3)
bench vit-b-16 --model ViT-B-16 "${methods[@]}"
bench vit-b-16-compiled --model ViT-B-16 --compile "${methods[@]}"
bench vit-b-16-fp32 --model ViT-B-16 --precision fp32 "${methods[@]}"
bench rn50-contiguous --model RN50 --no-channels-last -m itsm -m gradcam --prompts 3
bench rn50-channels-last --model RN50 --channels-last -m itsm -m gradcam --prompts 3
"$PYTHON" "$HERE/bench_photos.py" "$OUT/photos" "$PHOTOS"
bench pipeline-vit-b-16 --model ViT-B-16 --pipeline "$OUT/photos" --prompts 3
echo "rows in $OUT/*.json"
