#!/usr/bin/env bash
# One lent-GPU call: training runs side by side on one GPU, each TAG=NAME=OVERRIDES (preset
# fields as JSON), each fitting its step count to $MINUTES of training, then evaluated on world
# seed 0 and packed into $OUT (files over 16 MiB split in parts). MINUTES=0 runs each run's
# "steps" override instead. From the repo root:
#   OUT=/some/dir bash benchmarks/demo_training/gpu_run.sh s1=shapes-vlm-s='{}' l1=shapes-vlm-l='{"lr": 1e-3}'
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
MINUTES=${MINUTES:-7.5}
DEVICE=${DEVICE:-cuda}
EVAL_EVERY=${EVAL_EVERY:-0}  # > 0: a learning curve (200 selection-seed questions) every that many steps
RUN_TIMEOUT=${RUN_TIMEOUT:-0}  # seconds after which a run is stopped (its log still comes back); 0: never
PACK=${PACK-all}  # which runs' checkpoints come back: "all", or tags separated by spaces ("" for none)
# Only the demo package travels into the runs, so other packages' work in progress can't break them.
PKG=$(mktemp -d); mkdir -p "$PKG/edgelmm"; touch "$PKG/edgelmm/__init__.py"
cp -r src/edgelmm/demo "$PKG/edgelmm/"; rm -rf "$PKG/edgelmm/demo/checkpoints"
export PYTHONPATH=$PKG
CK=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

for spec in "$@"; do
  IFS='=' read -r tag name overrides <<<"$spec"
  (timeout "$RUN_TIMEOUT" python3 benchmarks/demo_training/sweep.py "$name" "$CK/$tag" "$MINUTES" "$overrides" "$DEVICE" "$EVAL_EVERY" >"$OUT/$tag.log" 2>&1
   echo "exit $?" >>"$OUT/$tag.log") &
done
wait

for f in "$OUT"/*.log; do  # one summary line per run
  grep -h '^{"name"' "$f" | python3 -c 'import json, sys; r = json.load(sys.stdin); print(sys.argv[1], r["steps"], r["vqa"], r["caption"])' "$(basename "$f")"
done
(cd "$OUT" && tar cf logs.tar ./*.log && rm ./*.log)
for d in "$CK"/*/; do
  tag=$(basename "$d")
  [[ $PACK == all || " $PACK " == *" $tag "* ]] || continue
  tar cf "$CK/$tag.tar" -C "$CK" "$tag"
  split -b 15m -d "$CK/$tag.tar" "$OUT/$tag.tar."
done
ls -l "$OUT"
