#!/usr/bin/env bash
# Edge-cloud collaboration on the demo models (shapes-vlm-l in the cloud; shapes-vlm-thumb-1l and
# shapes-vlm-thumb on the edge for routing, shapes-vlm-xs drafting for draft-verify, the caches and the faults),
# CPU only, cloud through `edgelmm serve` on loopback. Writes benchmarks/collab/results/.
#   bash benchmarks/collab/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
out=benchmarks/collab/results
lscpu | grep -E "Model name|^CPU\(s\)" > "$out/machine.txt"
# 1. draft-verify: lossless against cloud-only greedy through both protocols, the cloud's cost per
#    token, latency over injected RTTs, and the cloud's capacity under 16 edge clients
python benchmarks/collab/draft_verify.py --out "$out/draft-verify-cpu.json" > "$out/draft-verify-cpu.log" 2>&1
# 2. the second turn of a chat with and without the KV caches (edge torch, edge llamacpp, cloud)
python benchmarks/collab/caches.py --out "$out/caches-cpu.json" > "$out/caches-cpu.log" 2>&1
python benchmarks/collab/turn2_parts.py --out "$out/turn2-parts-cpu.json" > "$out/turn2-parts-cpu.log" 2>&1
# 3. the matrix: presets x tasks x RTTs, every strategy's curve, thresholds fitted on seed 1, reported on seed 0
edgelmm collab ablate configs/experiments/collab_demo.yaml --out "$out/ablate-cpu" > "$out/ablate-cpu.log" 2>&1
# 4. what routing costs a request kept on the edge
python benchmarks/collab/overhead.py --policy "$out/ablate-cpu/policies/shapes-vqa-baseline.yaml" \
  --out "$out/overhead-cpu.json" > "$out/overhead-cpu.log"
# 5. the cloud killed and restarted twice under 16 concurrent clients
python benchmarks/collab/faults.py --out "$out/faults-cpu.json" > "$out/faults-cpu.log"
# 6. the routing pair (shapes-vlm-thumb on the edge): its matrix, and what routing costs it
edgelmm collab ablate configs/experiments/collab_routing.yaml --out "$out/routing-cpu" > "$out/routing-cpu.log" 2>&1
python benchmarks/collab/overhead.py --policy "$out/routing-cpu/policies/shapes-vqa-baseline.yaml" --edge shapes-vlm-thumb \
  --out "$out/overhead-routing-cpu.json" > "$out/overhead-routing-cpu.log"
# 7. the routing pair at <= 85 % of the cloud (shapes-vlm-thumb-1l on the edge); the same matrix with the
#    plain fit (no confidence_level) went into routing-1l-plain-cpu
edgelmm collab ablate configs/experiments/collab_routing_1l.yaml --out "$out/routing-1l-cpu" > "$out/routing-1l-cpu.log" 2>&1
python benchmarks/collab/overhead.py --policy "$out/routing-1l-cpu/policies/shapes-vqa-baseline.yaml" --edge shapes-vlm-thumb-1l \
  --out "$out/overhead-routing-1l-cpu.json" > "$out/overhead-routing-1l-cpu.log"
