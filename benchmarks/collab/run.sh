#!/usr/bin/env bash
# Edge-cloud collaboration on the demo pair (shapes-vlm-xs on the edge, shapes-vlm-l in the cloud),
# CPU only, cloud through `edgelmm serve` on loopback. Writes benchmarks/collab/results/.
#   bash benchmarks/collab/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
out=benchmarks/collab/results
lscpu | grep -E "Model name|^CPU\(s\)" > "$out/machine.txt"
# 1. the matrix: presets x RTTs, every strategy's curve, thresholds fitted on seed 1 and reported on seed 0
edgelmm collab ablate configs/experiments/collab_demo.yaml --out "$out/ablate-cpu" > "$out/ablate-cpu.log"
# 2. what routing costs a request kept on the edge
python benchmarks/collab/overhead.py --policy "$out/ablate-cpu/policies/shapes-vqa-baseline.yaml" \
  --out "$out/overhead-cpu.json" > "$out/overhead-cpu.log"
# 3. the cloud killed and restarted twice under 16 concurrent clients
python benchmarks/collab/faults.py --out "$out/faults-cpu.json" > "$out/faults-cpu.log"
