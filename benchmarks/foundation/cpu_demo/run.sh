#!/usr/bin/env bash
# The README's CPU demo figures: plain `edgelmm demo` (32 samples per task) under /usr/bin/time,
# this checkout against OLD (a commit, default the one before the reliability work), alternating
# twice in one session, each run into a fresh folder. Run on a quiet machine.
#
#   bash benchmarks/foundation/cpu_demo/run.sh [OLD_COMMIT] > benchmarks/foundation/cpu_demo/run.log
set -euo pipefail
cd "$(dirname "$0")/../../.."
OLD=${1:-6e01bcf}
WORK=$(mktemp -d)
git worktree add -q --detach "$WORK/old" "$OLD"
trap 'git worktree remove --force "$WORK/old"; rm -rf "$WORK"' EXIT
echo "# bash benchmarks/foundation/cpu_demo/run.sh $OLD; $(date -u +%F), $(nproc) cores, $(python -c 'import platform; print(platform.processor() or platform.machine())'), torch $(python -c 'import torch; print(torch.__version__)'), transformers $(python -c 'import transformers; print(transformers.__version__)')"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in 1 2; do
  for side in old new; do
    src=src; [ "$side" = old ] && src="$WORK/old/src"
    echo "## $side ($([ "$side" = old ] && echo "$OLD" || git rev-parse --short HEAD)), round $round"
    PYTHONPATH=$src /usr/bin/time -f "wall %e s, peak RSS %M KiB" python -m edgelmm.cli demo --out "$WORK/$side-$round" 2>&1 \
      | grep -v "%|\|Loading\|report:"
  done
done
cp "$WORK/new-2/results.jsonl" "$WORK/new-2/report.md" benchmarks/foundation/cpu_demo/
