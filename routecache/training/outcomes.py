"""Labels from what the service logged (router/events.py, JsonlEventLog: one JSON object a line).

The classifier learns "did the cheap model fail on this prompt". An event log yields that label
in three ways, and only these (silence is not a label):

1. `outcome` events, written by whoever grades answers offline:
   {"kind": "outcome", "prompt": str, "weak_correct": bool, "strong_correct": bool?}
   or {"kind": "outcome", "response_id": str, "correct": bool} for a logged response.
2. A `completion` the cheap model produced (cache_outcome "miss", tier "cheap") that a
   `feedback` event on its response_id rates: thumbs up = the cheap model was right, thumbs down
   = it failed.
3. A `completion` with escalated = true: the cheap answer failed a validator, so the cheap model
   failed on that prompt whatever the strong model then answered. Not one with shared = true:
   an identical request's call answered it and that request's completion holds the label.

Requests that shared one call name its entry (entry_id): their ratings are that call's, one
label. A completion without an entry (not stored, or from a log older than `shared`) is labelled
on its own.

A response_id graded as correct (1) or by feedback (2) that the strong model answered says
nothing about the cheap one and is skipped, as are cache hits. Where several events label the
same response, or grade the same prompt, the last one wins (a user may change their rating, a
grader their grade). A rating or grade may come before its completion, or in another file:
the files are one log, and the same file given twice is read once. strong_correct is None
unless an outcome event states it: such rows train the failure model but are never used to
measure a router, which needs both labels. A grade that is not true or false (1 or 0), an
outcome event that carries a grade in neither shape of (1), a feedback rating that is not true
or false, or a completion whose prompt is not text is refused with its file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routecache.router.events import SkippedLines, event_lines, unique_events
from routecache.training.data_files import DataFileError, distinct_files
from routecache.unicode_text import check_encodable


@dataclass(frozen=True)
class EventLabel:
    prompt: str
    weak_correct: bool
    strong_correct: bool | None = None


def read_events(paths: Sequence[Path], skipped: SkippedLines | None = None) -> list[dict[str, Any]]:
    """The events of the logs. A line torn by a crash (the service's log leaves it in place)
    or of JSON that is no object is skipped and counted in `skipped`, as export-events does:
    stopping there refused the whole log for a line that holds no event. An event written
    twice (the same `event_id`: the Redis sink's copy, or one in two files) is read once, so
    it makes one label."""
    skipped = skipped if skipped is not None else SkippedLines()
    events: list[dict[str, Any]] = []
    for path in distinct_files(paths):
        events += _checked_events(path, skipped)
    return list(unique_events(events))


def _checked_events(path: Path, skipped: SkippedLines) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    try:
        for number, record in event_lines(path, skipped):
            try:
                _check_grades(record)
            except (TypeError, ValueError) as exc:
                raise DataFileError(f"{path}:{number}: {exc}") from exc
            events.append(record)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: cannot read it ({exc})") from exc
    return events


def _check_grades(event: dict[str, Any]) -> None:
    """Raises TypeError unless the grades an outcome event gives are true or false (1 or 0;
    strong_correct may be null: unknown) and a graded prompt is text, unless a feedback
    event's thumbs_up is true or false, and unless a completion's prompt is text; ValueError
    if an outcome event carries a grade in neither documented shape, or a prompt holds a lone
    surrogate (unicode_text.check_encodable). Graders write these by
    hand: bool() read "false" as correct, null as wrong and a null prompt as the prompt
    "None", labels trained on without a word; a feedback event without its rating read as a
    thumbs-down; a grade in another shape was dropped without a word."""
    kind = event.get("kind")
    if kind == "feedback":
        if not isinstance(event.get("thumbs_up"), bool):
            raise TypeError(f"thumbs_up must be true or false, not {event.get('thumbs_up')!r}")
        return
    if kind == "completion":
        # The label of a rated completion is its prompt: missing, it ended retrain in a
        # KeyError; null, it trained on the prompt "None".
        if not isinstance(event.get("prompt"), str):
            raise TypeError(f"prompt must be text, not {event.get('prompt', 'missing')!r}")
        check_encodable(event["prompt"])
        return
    if kind != "outcome":
        return
    _check_outcome_shape(event)
    for key in ("weak_correct", "strong_correct", "correct"):
        value = event.get(key)
        unknown = value is None and (key == "strong_correct" or key not in event)
        if not unknown and not (isinstance(value, int) and value in (0, 1)):  # a bool is an int
            raise TypeError(f"{key} must be true or false, not {value!r}")
    if _grades_a_prompt(event):
        if not isinstance(event["prompt"], str):
            raise TypeError(f"prompt must be text, not {event['prompt']!r}")
        check_encodable(event["prompt"])


def _check_outcome_shape(event: dict[str, Any]) -> None:
    """ValueError unless an outcome event that grades anything grades a prompt (prompt +
    weak_correct, strong_correct optional) or a logged response (response_id + correct). One
    without any grade is no label (silence); a grade in another shape is a grader's mistake."""
    grades = [key for key in ("weak_correct", "strong_correct", "correct") if key in event]
    if not grades:
        return
    prompt_shape = "prompt" in event and "weak_correct" in event and "correct" not in event
    response_shape = "response_id" in event and grades == ["correct"]
    if not (prompt_shape or response_shape):
        given = ", ".join(key for key in ("prompt", "response_id", *grades) if key in event)
        raise ValueError(
            "an outcome grades a prompt (prompt + weak_correct, strong_correct optional) or a"
            f" logged response (response_id + correct), not {given}"
        )


def labels_from_events(events: Iterable[dict[str, Any]]) -> list[EventLabel]:
    """Cheap-model labels by the rules of this module's docstring: graded prompts first, in
    the order each was first graded, then labels of responses in the order each response was
    first labelled."""
    events = list(events)
    # All completions first: a rating or grade may come before the completion it rates (a
    # grades file given before the log it grades), and still counts.
    completions = {
        response_id: event
        for event in events
        if event.get("kind") == "completion" and (response_id := str(event.get("response_id", "")))
    }
    by_response: dict[str, EventLabel] = {}
    by_prompt: dict[str, EventLabel] = {}
    for event in events:
        kind = event.get("kind")
        response_id = str(event.get("response_id", ""))
        if kind == "completion" and response_id:
            # A request that shared another's call copied its escalation: the maker's counts.
            escalated = event.get("escalated") and not event.get("shared")
            if escalated and event.get("cache_outcome") == "miss":
                by_response[_call_of(event)] = EventLabel(str(event["prompt"]), weak_correct=False)
        elif kind == "feedback" and response_id in completions:
            if not isinstance(thumbs_up := event.get("thumbs_up"), bool):
                continue  # no rating (read_events refuses it): silence is not a label
            label = _cheap_label(completions[response_id], thumbs_up)
            if label is not None:
                by_response[_call_of(completions[response_id])] = label
        elif kind == "outcome":
            label = _outcome_label(event, completions)
            # A graded prompt stands alone; a graded response (even one that also names its
            # prompt) is one more rating of that response, so the last rating still wins.
            if label is not None and _grades_a_prompt(event):
                by_prompt[label.prompt] = label  # re-graded: the latest grade wins
            elif label is not None:
                by_response[_call_of(completions[response_id])] = label
    return list(by_prompt.values()) + list(by_response.values())


def _call_of(completion: dict[str, Any]) -> str:
    """The answered call a completion's labels belong to: requests sharing one call (SingleFlight)
    name its maker's entry, so their ratings are one call's, the last winning. A completion
    with no entry (not stored, or an older log's) is a call of its own."""
    entry_id = completion.get("entry_id")
    return f"entry:{entry_id}" if entry_id else f"response:{completion.get('response_id', '')}"


def _cheap_label(completion: dict[str, Any], correct: bool) -> EventLabel | None:
    answered_by_cheap = completion.get("tier") == "cheap" and not completion.get("escalated")
    if completion.get("cache_outcome") != "miss" or not answered_by_cheap:
        return None
    return EventLabel(str(completion["prompt"]), weak_correct=correct)


def _grades_a_prompt(event: dict[str, Any]) -> bool:
    return "prompt" in event and "weak_correct" in event


def _outcome_label(
    event: dict[str, Any], completions: dict[str, dict[str, Any]]
) -> EventLabel | None:
    if _grades_a_prompt(event):
        strong = event.get("strong_correct")
        return EventLabel(
            str(event["prompt"]),
            bool(event["weak_correct"]),
            None if strong is None else bool(strong),
        )
    completion = completions.get(str(event.get("response_id", "")))
    if completion is None or "correct" not in event:
        return None
    return _cheap_label(completion, bool(event["correct"]))
