#!/usr/bin/env bash
# AWQ's options on the demo VLMs, next to the float model and demo_cpu.sh's RTN / AWQ checkpoints
# (run demo_cpu.sh first): calibration on image conversations instead of caption text, no
# clipping, the paper's activation-only scaling, and both. Every AWQ variant is quantized in
# memory by quant-eval with the same 4-bit group-128 format; calibration comes from training
# seeds only, and the evaluation is demo_cpu.sh's.
#
#   bash benchmarks/quantization/demo_awq_options.sh MODEL [SAMPLES] [PPL_SAMPLES] [TEXT_SAMPLES]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=$1
SAMPLES=${2:-200}
PPL_SAMPLES=${3:-100}
TEXT_SAMPLES=${4:-1000}
WORK=${WORK:-runs/quantization}
mkdir -p "$WORK"
TEXT="bits=4, group_size=128, calibration={'source': 'shapes', 'num_samples': 32, 'max_seq_len': 256}"  # demo_cpu.sh's
IMAGES="bits=4, group_size=128, calibration={'source': 'shapes-images', 'num_samples': 64}"             # 64 conversations with pictures
edgelmm quant-eval "$MODEL" "$WORK/$MODEL-rtn" "$WORK/$MODEL-awq" \
  --method "awq($IMAGES)" --method "awq($TEXT, clip=False)" --method "awq($TEXT, duo_scaling=False)" \
  --method "awq($IMAGES, clip=False)" \
  --samples "$SAMPLES" --ppl-samples "$PPL_SAMPLES" --text-ppl shapes-text --text-ppl-samples "$TEXT_SAMPLES" \
  --device cpu --out "benchmarks/quantization/results/demo-awq-options-$MODEL"
