#!/usr/bin/env bash
# Float vs RTN vs AWQ (W4A16) on the bundled demo VLMs, on the CPU: shapes-vqa accuracy,
# shapes caption perplexity (captions given their picture), weight memory, decode speed.
#
#   bash benchmarks/quantization/demo_cpu.sh [SAMPLES] [PPL_SAMPLES]
#
# Group size 64, not 128: the demo models' widths (192 / 576 for -s, 320 / 960 for -l) are not
# multiples of 128, and edgelmm refuses a group size that does not divide a layer. AWQ calibrates
# on 32 blocks of 256 tokens of shapes-world captions (8k tokens; the captions are short and
# regular, and the 2-core CPU makes AutoAWQ's 128 x 512 slow).
set -euo pipefail
cd "$(dirname "$0")/../.."
SAMPLES=${1:-200}
PPL_SAMPLES=${2:-100}
OUT=benchmarks/quantization/results
WORK=${WORK:-runs/quantization}
for model in shapes-vlm-s shapes-vlm-l; do
  for method in rtn awq; do
    edgelmm quantize "$model" --method "$method" --bits 4 --group-size 64 --device cpu --out "$WORK/$model-$method" --overwrite \
      $([ "$method" = awq ] && echo --calib shapes --calib-samples 32 --calib-seq-len 256)
  done
  edgelmm quant-eval "$model" "$WORK/$model-rtn" "$WORK/$model-awq" --samples "$SAMPLES" --ppl-samples "$PPL_SAMPLES" \
    --device cpu --out "$OUT/demo-$model"
done
