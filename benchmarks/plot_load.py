"""Plot a grpc_load JSON report: p50/p99 latency and throughput per path against concurrency.

python -m benchmarks.plot_load RESULTS.json OUT.png
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PATHS = {"exact": "exact", "semantic": "semantic", "miss_strong": "miss"}


def series(report: dict[str, Any], name: str, metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for level, paths in sorted(report["levels"].items(), key=lambda kv: int(kv[0])):
        summary = paths[PATHS[name]].get(name, {})
        if summary.get("count"):
            xs.append(int(level))
            ys.append(float(summary[metric]))
    return xs, ys


def main() -> None:
    with open(sys.argv[1]) as results:
        report = json.load(results)
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for name in PATHS:
        for metric, style in (("p50_ms", "-o"), ("p99_ms", "--")):
            xs, ys = series(report, name, metric)
            latency.plot(xs, ys, style, label=f"{name} {metric[:3]}")
        xs, ys = series(report, name, "throughput_per_s")
        throughput.plot(xs, ys, "-o", label=name)
    if "embedding" in report:
        best = report["embedding"]["best_throughput_per_s"]
        throughput.axhline(best, color="grey", linestyle=":", label="embedding limit (outside)")
    for axis, label in ((latency, "latency (ms)"), (throughput, "requests/s")):
        axis.set_xscale("log")
        axis.set_xlabel("concurrent callers")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    latency.set_yscale("log")
    figure.suptitle("routecache over gRPC, 2-core CPU (benchmarks/grpc_load.py)")
    figure.tight_layout()
    figure.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
