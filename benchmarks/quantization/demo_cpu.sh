#!/usr/bin/env bash
# Float vs RTN vs AWQ (W4A16) on the bundled demo VLMs, on the CPU: shapes-vqa accuracy,
# caption perplexity (captions given their picture), text perplexity (the language model alone on
# shapes-world captions as plain text, sliding window), weight memory, decode speed.
#
#   bash benchmarks/quantization/demo_cpu.sh [SAMPLES] [PPL_SAMPLES] [TEXT_SAMPLES]
#
# 4 bits, group 128 (the issue's default; it divides every decoder linear of the demo models:
# hidden 128 / 256, intermediate 384 / 768). AWQ calibrates on 32 blocks of 256 tokens of
# shapes-world captions from training seeds (8k tokens; the captions are short and regular, and
# the 2-core CPU makes AutoAWQ's 128 x 512 slow). Evaluation uses evaluation seeds only
# (shapes-vqa seed 0, caption perplexity seed 1, shapes-text seed 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
SAMPLES=${1:-200}
PPL_SAMPLES=${2:-100}
TEXT_SAMPLES=${3:-1000}
OUT=benchmarks/quantization/results
WORK=${WORK:-runs/quantization}
mkdir -p "$WORK"
for model in shapes-vlm-s shapes-vlm-l; do
  for method in rtn awq; do
    edgelmm quantize "$model" --method "$method" --bits 4 --group-size 128 --device cpu --out "$WORK/$model-$method" --overwrite \
      $([ "$method" = awq ] && echo --calibration shapes --num-samples 32 --max-seq-len 256)
  done
  edgelmm quant-eval "$model" "$WORK/$model-rtn" "$WORK/$model-awq" --samples "$SAMPLES" --ppl-samples "$PPL_SAMPLES" \
    --text-ppl shapes-text --text-ppl-samples "$TEXT_SAMPLES" --device cpu --out "$OUT/demo-$model"
  for method in rtn awq; do  # what was quantized, how, and how long it took
    cp "$WORK/$model-$method/edgelmm_quantization.json" "$OUT/demo-$model/$method-quantization.json"
  done
done
