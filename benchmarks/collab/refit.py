"""Fit every strategy of a finished `edgelmm collab ablate` folder again, for other targets, on its
calibration cells, and apply each fit to its test cells (RTT 0): no model runs again.

    python benchmarks/collab/refit.py CONFIG.yaml RESULTS_DIR --target-quality 0.97,0.99 \
        [--confidence-level 0.9] [--out FILE.json]

The fits and measurements are `edgelmm.collab.calibrate.fit` and `measure`, as in the ablation's
report; what changes is the target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgelmm.collab import ablate, calibrate
from edgelmm.collab.confidence import parse_strategy
from edgelmm.config import load_yaml
from edgelmm.utils.io import atomic_write_text, read_jsonl_records


def refit(config: ablate.AblateConfig, out: Path, targets: list[float], level: float | None) -> list[dict]:
    records = [r for _, r in read_jsonl_records(out / ablate.RESULTS)]
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        fit_on, test = (ablate.split_samples(out, records, task, split) for split in ("calibration", "test"))
        if fit_on is None or test is None:
            raise SystemExit(f"{out}: the edge-only and cloud-only cells of {task} are not all finished")
        cloud = sum(s.cloud_score for s in test) / len(test)
        for spec in dict.fromkeys([*config.strategies, config.policy.strategy]):
            base = config.policy.model_copy(update={"strategy": spec})
            for target in targets:
                policy = calibrate.fit(base, fit_on, target_quality=target, confidence_level=level)
                measured = calibrate.measure(policy, test)
                rows.append({"task": task, "strategy": str(parse_strategy(policy.strategy)), "target_quality": target,
                             "confidence_level": level, "fitted_share": policy.fitted["cloud_share"],
                             "test_share": round(measured["cloud_share"], 4),
                             "test_of_cloud": round(measured["accuracy"] / cloud, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("results", type=Path)
    parser.add_argument("--target-quality", default="0.97,0.99")
    parser.add_argument("--confidence-level", type=float)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config = load_yaml(args.config, ablate.AblateConfig)
    rows = refit(config, args.results, [float(t) for t in args.target_quality.split(",")], args.confidence_level)
    for r in rows:
        print(f"{r['strategy'][:60]:60s} target {r['target_quality']:.2f}: fitted share {r['fitted_share']:.1%}, "
              f"on the test seed {r['test_share']:.1%} sent, {r['test_of_cloud']:.1%} of the cloud")
    if args.out:
        atomic_write_text(args.out, json.dumps({"command": "python benchmarks/collab/refit.py " + " ".join(sys.argv[1:] if argv is None else argv),
                                                "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
