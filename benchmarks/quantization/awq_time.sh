#!/usr/bin/env bash
# How long `edgelmm quantize --method awq` takes, and its peak memory, with the defaults
# (128 calibration blocks of 512 tokens of shapes-world captions) on each bundled demo model.
#
#   bash benchmarks/quantization/awq_time.sh [OUT_LOG]
#
# Run it on a quiet machine; PYTHONPATH=OTHER_CHECKOUT/src times another version side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOG=${1:-/dev/stdout}
WORK=${WORK:-runs/awq-time}
mkdir -p "$WORK"
for model in shapes-vlm-s shapes-vlm-l; do
  /usr/bin/time -f "$model: wall %e s, peak RSS %M KiB" \
    python -m edgelmm.cli quantize "$model" --method awq --device cpu --out "$WORK/$model" --overwrite 2>&1 \
    | grep -E "linear layers in|wall" >> "$LOG"
done
