"""Writes cache_hit_analysis.ipynb (without outputs): edit the cells here, then run
`python notebooks/build_notebook.py`. Keeping the source as Python keeps reviews readable."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS: list[tuple[str, str] | tuple[str, str, list[str]]] = [
    ("md", """# Cache-hit analysis

Is the cache saving money, and are its answers still right? This notebook reads the routecache
event log (one event per request, feedback and invalidation) and shows hit rates over time, the
similarity of hits against the feedback they got, the false hits to review, the savings, the
routing split against quality and the latency by path.

**Input.** A parquet export (`routecache export-events --events EVENTS.jsonl --since 7d --out
events.parquet`) or a JSONL event log directly. Set `ROUTECACHE_EVENTS` to its path, or edit the
parameters cell. To try it on a demo run:

```bash
routecache demo --similarity-threshold 0.65 --events-out /tmp/events.jsonl
routecache export-events --events /tmp/events.jsonl --out /tmp/events.parquet
ROUTECACHE_EVENTS=/tmp/events.parquet jupyter nbconvert --to notebook --execute \\
    notebooks/cache_hit_analysis.ipynb --output /tmp/analysis.ipynb
```

Without a path it reads `tests/fixtures/demo_events.jsonl`, a recorded demo run."""),
    ("code", """import os
from pathlib import Path

EVENTS = os.environ.get("ROUTECACHE_EVENTS", "../tests/fixtures/demo_events.jsonl")
SIMILARITY_THRESHOLD = float(os.environ.get("ROUTECACHE_SIMILARITY_THRESHOLD", "0.65"))""",
     ["parameters"]),
    ("code", """import json

import matplotlib.pyplot as plt
import pandas as pd

from routecache.analysis import cache_hits as ch

pd.set_option("display.max_colwidth", 80)
events = ch.load_events(Path(EVENTS))
requests = ch.requests(events)
print(f"{len(events)} events from {EVENTS}")
print(events["kind"].value_counts().to_string())
print(requests["path"].value_counts().reindex(ch.PATH_ORDER).dropna().astype(int).to_string())"""),
    ("md", "## Hit rate over time"),
    ("code", """rates = ch.hit_rate_over_time(events)
ax = rates[["exact_hit_rate", "semantic_hit_rate"]].plot(marker="o", figsize=(8, 3.5))
ax.set_ylabel("share of requests")
ax.set_title("Hit rate over time")
plt.show()
rates"""),
    ("md", """## Similarity of hits against feedback

Semantic hits close to the threshold carry most of the risk: where the thumbs-down sit says
whether the threshold is right."""),
    ("code", """hits = ch.hits_with_feedback(events)
semantic = hits[hits["path"] == "semantic_hit"]
fig, ax = plt.subplots(figsize=(8, 3.5))
for label, group in semantic.groupby("feedback"):
    ax.hist(group["similarity"], bins=20, range=(SIMILARITY_THRESHOLD, 1.0), alpha=0.6,
            label=f"{label} ({len(group)})")
ax.axvline(SIMILARITY_THRESHOLD, color="black", linestyle="--", label="threshold")
ax.set_xlabel("cosine similarity of the hit")
ax.set_ylabel("semantic hits")
ax.set_title("Similarity of semantic hits by feedback")
ax.legend()
plt.show()
semantic.groupby("feedback")["similarity"].describe()"""),
    ("md", """## False hits to review

Hits that got a thumbs-down (each one already removed its entry and made its neighbours harder
to serve). The question asked, next to the question whose answer was served."""),
    ("code", """review = ch.false_hit_review(events)
review"""),
    ("md", "## Savings"),
    ("code", """money = ch.savings(events)
ax = money.set_index("time")[["spent_usd", "saved_usd"]].plot(figsize=(8, 3.5))
ax.set_ylabel("USD, cumulative")
ax.set_title("Spend and spend avoided")
plt.show()
total_spent, total_saved = money["spent_usd"].iloc[-1], money["saved_usd"].iloc[-1]
print(f"spent {total_spent:.4f} USD, saved {total_saved:.4f} USD "
      f"({total_saved / (total_spent + total_saved):.1%} of what it would have cost)")"""),
    ("md", """## Routing split against quality

Per path: how many requests, how many cheap answers failed validation and were escalated, and
the feedback received. Below, the classifier's difficulty score of the model calls by tier."""),
    ("code", """quality = ch.routing_vs_quality(events)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
quality["requests"].plot.bar(ax=left, title="Requests by path")
models = requests[requests["path"].isin(["cheap", "strong"])]
for tier, group in models.groupby("path"):
    right.hist(group["difficulty"].dropna(), bins=15, range=(0, 1), alpha=0.6, label=tier)
right.set_xlabel("P(cheap model fails)")
right.set_title("Difficulty by tier served")
right.legend()
plt.show()
quality"""),
    ("md", "## Latency by path"),
    ("code", """latency = ch.latency_by_path(events)
fig, ax = plt.subplots(figsize=(8, 3.5))
paths = list(latency.index)
ax.boxplot([requests.loc[requests["path"] == p, "latency_ms"] for p in paths], tick_labels=paths)
ax.set_yscale("log")
ax.set_ylabel("ms (log scale)")
ax.set_title("Request latency by path")
plt.show()
latency"""),
    ("md", "## Summary (machine-readable: the test suite checks it against the event log)"),
    ("code", """summary = {
    "events": int(len(events)),
    "requests": int(len(requests)),
    "hits": int(requests["hit"].sum()),
    "semantic_hits": int((requests["path"] == "semantic_hit").sum()),
    "thumbs_down_hits": int((hits["feedback"] == "down").sum()),
    "false_hits_listed": int(len(review)),
    "saved_usd": round(float(total_saved), 6),
}
print("SUMMARY " + json.dumps(summary))"""),
]


def build() -> nbformat.NotebookNode:
    notebook = new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3", "display_name": "Python 3", "language": "python"
    }  # fmt: skip
    for kind, source, *tags in CELLS:
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags[0]
        notebook.cells.append(cell)
    return notebook


if __name__ == "__main__":
    target = Path(__file__).with_name("cache_hit_analysis.ipynb")
    nbformat.write(build(), target)
    print(f"wrote {target}")
