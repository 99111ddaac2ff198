"""The cache-hit analysis behind notebooks/cache_hit_analysis.ipynb, on the exported events.

Every function takes the frame of `load_events` (one row per event, see export.events_frame)
and returns a small frame the notebook prints or plots.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from routecache.analysis.export import events_frame, read_events

HIT_PATHS = ("exact_hit", "semantic_hit")
PATH_ORDER = ("exact_hit", "semantic_hit", "cheap", "strong", "error")
# The event fields the tables read. A log with no request in it (empty, cut by --since, or
# feedback alone) has none of them as columns; they are added empty so each table is empty too.
EVENT_COLUMNS = ("kind", "ts", "time", "response_id", "tenant", "prompt", "path", "similarity",
                 "entry_id", "cost_usd", "saved_usd", "escalated", "validation_escalated",
                 "latency_ms", "thumbs_up", "correction", "admin", "shared")  # fmt: skip


def load_events(path: Path) -> pd.DataFrame:
    """A parquet export, or a JSONL event log read directly; an event written twice (the same
    `event_id`) once, as export-events reads it."""
    if path.suffix == ".parquet":
        return _first_of_each_id(pd.read_parquet(path))
    return events_frame(list(read_events(path)))


def _first_of_each_id(events: pd.DataFrame) -> pd.DataFrame:
    """Rows without an `event_id` (an older log's) kept, each id's first row only."""
    if "event_id" not in events.columns:
        return events
    ids = events["event_id"]
    return events[ids.isna() | ~ids.duplicated()].reset_index(drop=True)


def with_event_columns(events: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in EVENT_COLUMNS if column not in events.columns]
    return events.assign(**dict.fromkeys(missing, float("nan"))) if missing else events


def feedback_events(events: pd.DataFrame) -> pd.DataFrame:
    """The latest feedback on each response. A response can be rated again; joining every
    rating to its request would count (and cost) the request once per rating."""
    events = with_event_columns(events)
    feedback = events[events["kind"] == "feedback"]
    return feedback.sort_values("ts", kind="stable").drop_duplicates("response_id", keep="last")


def requests(events: pd.DataFrame) -> pd.DataFrame:
    """Answered and failed requests (completion and error events), each with its path.

    A failed Feedback, Invalidate or GetStats call (an error event with `admin` true) is no
    request: counted, it lowered every hit rate. An error event of a log written before the
    field existed has none, and counts as a request, as it did."""
    events = with_event_columns(events)
    request_kind = events["kind"].isin(["completion", "error"])
    rows = events[request_kind & ~events["admin"].eq(True)].copy()
    rows["path"] = rows["path"].fillna("error")
    rows["hit"] = rows["path"].isin(HIT_PATHS)
    return rows


def hit_rate_over_time(events: pd.DataFrame, buckets: int = 12) -> pd.DataFrame:
    """Exact and semantic hit rate per time bucket (the run's span cut into `buckets`)."""
    rows = requests(events)
    if rows.empty:  # no time span to cut into buckets
        return pd.DataFrame(columns=["requests", "exact_hit_rate", "semantic_hit_rate"])
    span = (rows["time"].max() - rows["time"].min()) / buckets
    freq = max(span, pd.Timedelta(seconds=1)).ceil("s")
    grouped = rows.set_index("time").groupby(pd.Grouper(freq=freq))
    out = pd.DataFrame(
        {
            "requests": grouped.size(),
            "exact_hit_rate": grouped["path"].apply(lambda p: (p == "exact_hit").mean()),
            "semantic_hit_rate": grouped["path"].apply(lambda p: (p == "semantic_hit").mean()),
        }
    )
    return out[out["requests"] > 0]


def hits_with_feedback(events: pd.DataFrame) -> pd.DataFrame:
    """Every cache hit, with the feedback it got ("up", "down" or "none")."""
    hits = requests(events)
    hits = hits[hits["hit"]][["response_id", "time", "tenant", "prompt", "path", "similarity",
                              "entry_id"]]  # fmt: skip
    feedback = feedback_events(events)[["response_id", "thumbs_up", "correction"]]
    merged = hits.merge(feedback, on="response_id", how="left")
    merged["feedback"] = merged["thumbs_up"].map({True: "up", False: "down"}).fillna("none")
    return merged.drop(columns=["thumbs_up"])


def false_hit_review(events: pd.DataFrame) -> pd.DataFrame:
    """Hits that got a thumbs-down, next to the question whose answer they were served."""
    hits = hits_with_feedback(events)
    bad = hits[hits["feedback"] == "down"]
    stored = requests(events)
    stored = stored[~stored["hit"] & (stored["entry_id"].fillna("") != "")]
    origin = stored[["entry_id", "prompt"]].rename(columns={"prompt": "cached_question"})
    review = bad.merge(origin.drop_duplicates("entry_id"), on="entry_id", how="left")
    columns = ["time", "tenant", "similarity", "prompt", "cached_question", "correction"]
    return review[columns].sort_values("similarity", ascending=False).reset_index(drop=True)


def savings(events: pd.DataFrame) -> pd.DataFrame:
    """Cumulative spend and cumulative spend avoided (cache hits, shared calls) over time."""
    rows = requests(events).sort_values("time")
    return pd.DataFrame(
        {
            "time": rows["time"],
            "spent_usd": rows["cost_usd"].fillna(0).cumsum(),
            "saved_usd": rows["saved_usd"].fillna(0).cumsum(),
        }
    ).reset_index(drop=True)


def routing_vs_quality(events: pd.DataFrame) -> pd.DataFrame:
    """Per path: requests, escalations (an escalated request whose strong call then failed
    too, under "error"; a call shared by identical requests once), cost, the feedback received
    and its approval rate."""
    rows = requests(events).drop(columns=["thumbs_up"], errors="ignore")
    feedback = feedback_events(events)[["response_id", "thumbs_up"]]
    rows = rows.merge(feedback, on="response_id", how="left")
    rows["up"] = rows["thumbs_up"].eq(True)
    rows["down"] = rows["thumbs_up"].eq(False)
    # An error event carries no top-level `escalated`, only its validation's (flattened to
    # validation_escalated): an escalation whose strong call failed counts, as in GetStats.
    escalated = rows["escalated"].eq(True) | rows["validation_escalated"].eq(True)
    # Each request sharing a call copies its escalation (`shared` true): the one that made the
    # call counts it, as GetStats and routecache_escalations_total do. A log older than the
    # field has none, and each escalation counts as before.
    rows["escalated"] = escalated & ~rows["shared"].eq(True)
    rows["cost_usd"] = rows["cost_usd"].fillna(0.0)
    grouped = rows.groupby("path")
    table = pd.DataFrame(
        {
            "requests": grouped.size(),
            "escalated": grouped["escalated"].sum().astype(int),
            "thumbs_up": grouped["up"].sum().astype(int),
            "thumbs_down": grouped["down"].sum().astype(int),
            "cost_usd": grouped["cost_usd"].sum(),
        }
    )
    rated = table["thumbs_up"] + table["thumbs_down"]
    table["approval"] = (table["thumbs_up"] / rated).where(rated > 0)
    return table.reindex([p for p in PATH_ORDER if p in table.index])


def latency_by_path(events: pd.DataFrame) -> pd.DataFrame:
    """p50/p95/p99 of request latency (ms) per path."""
    rows = requests(events)
    grouped = rows.groupby("path")["latency_ms"]
    table = pd.DataFrame(
        {
            "count": grouped.size(),
            "p50_ms": grouped.quantile(0.50),
            "p95_ms": grouped.quantile(0.95),
            "p99_ms": grouped.quantile(0.99),
        }
    )
    return table.reindex([p for p in PATH_ORDER if p in table.index])
