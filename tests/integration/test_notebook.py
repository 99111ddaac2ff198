"""The cache-hit analysis notebook runs top to bottom on a recorded demo run's events, exported
to parquet by the export command, and its figures come from those events."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from routecache.router.cli import main

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "cache_hit_analysis.ipynb"
EVENTS = ROOT / "tests" / "fixtures" / "demo_events.jsonl"

pytestmark = pytest.mark.integration


def expected_summary() -> dict[str, object]:
    """The same figures, counted straight from the JSONL without pandas or the notebook."""
    events = [json.loads(line) for line in EVENTS.read_text().splitlines() if line.strip()]
    answers = [e for e in events if e["kind"] in ("completion", "error")]
    hits = [e for e in answers if e.get("path") in ("exact_hit", "semantic_hit")]
    hit_ids = {e["response_id"] for e in hits}
    down = [e for e in events if e["kind"] == "feedback" and not e["thumbs_up"]]
    return {
        "events": len(events),
        "requests": len(answers),
        "hits": len(hits),
        "semantic_hits": sum(e["path"] == "semantic_hit" for e in hits),
        "thumbs_down_hits": sum(e["response_id"] in hit_ids for e in down),
        "false_hits_listed": sum(e["response_id"] in hit_ids for e in down),
        "saved_usd": round(sum(e.get("saved_usd", 0.0) for e in answers), 6),
    }


def execute_notebook(events: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The notebook run top to bottom on `events`; returns it with its outputs."""
    monkeypatch.setenv("ROUTECACHE_NOTEBOOK_EVENTS", str(events))
    # The kernel is a child process: it must import this checkout's routecache.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]  # nbformat is untyped
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip
    return notebook


def printed_summary(notebook: Any) -> dict[str, Any]:
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    summary_line = next(line for line in printed.splitlines() if line.startswith("SUMMARY "))
    summary: dict[str, Any] = json.loads(summary_line.removeprefix("SUMMARY "))
    return summary


def test_notebook_executes_on_exported_demo_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parquet = tmp_path / "events.parquet"
    assert main(["export-events", "--events", str(EVENTS), "--out", str(parquet)]) == 0
    notebook = execute_notebook(parquet, monkeypatch)

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 5
    summary = printed_summary(notebook)
    assert summary == expected_summary()
    assert summary["false_hits_listed"] >= 1  # the fixture holds real false hits to review
    review = next(o for c in notebook.cells if "false_hit_review" in c.source for o in c.outputs)
    assert "What is the capital of Spain?" in review["data"]["text/plain"]


@pytest.mark.parametrize(
    "lines",
    [[], ['{"kind": "feedback", "ts": 1700000000, "response_id": "r1", "thumbs_up": false}']],
    ids=["empty-log", "feedback-only-log"],
)
def test_notebook_executes_on_a_log_with_no_requests(
    lines: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh deployment's log, or one whose requests were rotated away: nothing to plot, but
    # every cell still runs and the summary says so.
    events = tmp_path / "events.jsonl"
    events.write_text("".join(line + "\n" for line in lines))
    summary = printed_summary(execute_notebook(events, monkeypatch))
    assert summary == {"events": len(lines), "requests": 0, "hits": 0, "semantic_hits": 0,
                       "thumbs_down_hits": 0, "false_hits_listed": 0, "saved_usd": 0.0}  # fmt: skip
