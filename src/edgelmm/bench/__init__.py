"""Benchmarks and evaluation over a matrix of models × backends × methods × tasks, with reports.

    >>> config = bench_config_from_args("shapes-vlm-s", tasks="shapes-vqa", samples=16, device="cpu")
    >>> rows = run_bench(config, "runs/quick")
    >>> print(format_table(rows))
"""

from __future__ import annotations

from edgelmm.bench.report import format_table, read_results, write_report
from edgelmm.bench.runner import bench_config_from_args, plan_cells, run_bench, run_eval

__all__ = ["bench_config_from_args", "format_table", "plan_cells", "read_results", "run_bench", "run_eval", "write_report"]
