"""The event export (JSONL → parquet) and the structured logs."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Never, TypeAlias

import grpc
import grpc.aio
import pandas as pd
import pytest

from routecache.analysis.cache_hits import load_events
from routecache.analysis.export import (
    events_frame,
    parse_since,
    read_events,
    write_jsonl,
    write_parquet,
)
from routecache.errors import Unavailable, UpstreamError
from routecache.router.bootstrap import Overrides, open_events
from routecache.router.events import (
    InMemoryEventLog,
    JsonlEventLog,
    SkippedLines,
    event_json,
    event_lines,
)
from routecache.router.logs import (
    REQUEST_ID,
    JsonFormatter,
    RequestIdFilter,
    configure_logging,
    new_request_id,
)
from routecache.router.metrics import PrometheusTelemetry
from routecache.router.releasing import Acquired
from routecache.router.servicer import RouteCacheServicer
from routecache.router.settings import ConfigError, load_settings
from routecache.v1 import routecache_pb2 as pb
from tests.unit.conftest import KEYS, make_harness, unit_settings
from tests.unit.test_telemetry import ask as _ask

if TYPE_CHECKING:
    from grpc import Status

    MetadataType: TypeAlias = grpc.aio.Metadata | Sequence[tuple[str, str | bytes]]

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", NOW - 5400),
        ("24h", NOW - 86400),
        ("7d", NOW - 7 * 86400),
        ("1699999000", 1_699_999_000.0),
        ("2023-11-14T22:13:20", NOW),
        ("2023-11-14T22:13:20+00:00", NOW),
    ],
)
def test_since_accepts_durations_dates_and_epochs(text: str, expected: float) -> None:
    assert parse_since(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["last tuesday", "nan", "inf", "-Infinity"])
def test_since_rejects_nonsense_with_the_accepted_forms(text: str) -> None:
    # float() reads "nan" and "inf": no event is at or after NaN or inf, so the export was
    # silently empty (and "-inf" kept everything).
    with pytest.raises(ValueError, match="duration"):
        parse_since(text, now=NOW)


def export_log(source: Path, out: Path, since: float | None = None) -> int:
    """What `routecache export-events --format parquet` does with a JSONL log: its events at or
    after `since` as one parquet table in `out`; returns the count."""
    return write_parquet(list(read_events(source, since)), out, f"event log {source}")


def write_log(path: Path) -> None:
    log = JsonlEventLog(path)
    log.emit("completion", {"response_id": "r1", "path": "cheap", "latency": {"embed_ms": 3.0},
                            "failed_validators": []})  # fmt: skip
    log.emit("feedback", {"response_id": "r1", "thumbs_up": False})
    log.close()


def test_export_writes_one_flat_row_per_event_and_filters_by_time(tmp_path: Path) -> None:
    source, out = tmp_path / "events.jsonl", tmp_path / "out" / "events.parquet"
    write_log(source)
    with source.open("a") as torn:
        torn.write('{"kind": "completion", "ts": ')  # a crash mid-line
    assert export_log(source, out) == 2
    frame = pd.read_parquet(out)
    assert list(frame["kind"]) == ["completion", "feedback"]
    assert frame.loc[0, "latency_embed_ms"] == 3.0
    assert frame.loc[0, "failed_validators"] == "[]"
    assert str(frame["time"].dtype).startswith("datetime64")
    future = max(e["ts"] for e in read_events(source)) + 1
    assert export_log(source, out, since=future) == 0


@pytest.mark.parametrize("since", [None, 0.0])
@pytest.mark.parametrize(
    "ts", ['"yesterday"', '"1700000000"', "true", "[1]", "{}", "NaN", "Infinity", "1e11", "-1e20"]
)
def test_a_hand_edited_line_whose_ts_is_no_number_is_skipped(
    tmp_path: Path, ts: str, since: float | None
) -> None:
    source, out = tmp_path / "events.jsonl", tmp_path / "events.parquet"
    write_log(source)
    with source.open("a") as edited:
        edited.write(f'{{"kind": "feedback", "response_id": "r1", "ts": {ts}}}\n')
    assert [e["kind"] for e in read_events(source, since)] == ["completion", "feedback"]
    assert export_log(source, out, since) == 2


def test_json_log_lines_carry_the_request_id_and_extra_fields() -> None:
    new_request_id("req-42")
    record = logging.LogRecord("routecache.x", logging.WARNING, __file__, 1, "failed %s", ("x",),
                               None)  # fmt: skip
    record.tenant = "acme"
    RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-42" and line["tenant"] == "acme"
    assert line["message"] == "failed x" and line["level"] == "warning"
    assert new_request_id("  ") != "req-42" and len(REQUEST_ID.get()) == 32


def test_json_log_lines_write_extra_values_json_cannot_hold_as_text() -> None:
    # A Path (or any object) in `extra` must not turn the line into a logging error.
    record = logging.LogRecord("routecache.x", logging.INFO, __file__, 1, "saved", None, None)
    record.path = Path("/var/lib/routecache/snapshot")
    assert json.loads(JsonFormatter().format(record))["path"] == "/var/lib/routecache/snapshot"


def test_an_extra_field_named_like_a_standard_one_does_not_replace_it() -> None:
    # `extra={"level": ...}` replaced the record's own level: a log pipeline filtering on it
    # would have dropped or raised the line.
    record = logging.LogRecord("routecache.x", logging.ERROR, __file__, 1, "boom", None, None)
    record.level, record.logger, record.ts = "low", "other", "yesterday"
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"]) == ("error", "routecache.x")
    assert line["ts"].endswith("Z")


def test_a_json_line_formatted_without_the_filter_still_names_its_request() -> None:
    # A handler someone adds without RequestIdFilter: the id comes from the request context.
    new_request_id("req-7")
    record = logging.LogRecord("routecache.x", logging.INFO, __file__, 1, "hello", None, None)
    assert json.loads(JsonFormatter().format(record))["request_id"] == "req-7"


def test_a_callers_long_request_id_is_cut_to_128_characters() -> None:
    assert new_request_id(" " + "r" * 300 + " ") == "r" * 128 == REQUEST_ID.get()


@pytest.fixture
def machine_in_new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is not UTC for the test."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("machine_in_new_york")
def test_json_log_lines_carry_millisecond_utc_time_and_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("routecache.x", logging.ERROR, __file__, 1, "failed", None,
                                   sys.exc_info())  # fmt: skip
    record.created, record.msecs = 1_700_000_000.0, 7.0
    line = json.loads(JsonFormatter().format(record))
    assert line["ts"] == "2023-11-14T22:13:20.007Z"
    assert "RuntimeError: boom" in line["exception"]


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger as configure_logging leaves it, restored afterwards for pytest."""
    root, chatty = logging.getLogger(), logging.getLogger("httpx")
    handlers, level, chatty_level = root.handlers[:], root.level, chatty.level
    yield root
    root.handlers[:], root.level = handlers, level
    chatty.setLevel(chatty_level)


@pytest.mark.parametrize(
    ("fmt", "formatter"), [("json", JsonFormatter), ("text", logging.Formatter)]
)
def test_configure_logging_replaces_the_root_handlers_with_one_of_the_format(
    root_logging: logging.Logger, fmt: Literal["text", "json"], formatter: type
) -> None:
    configure_logging(fmt, "warning", quiet_libraries=True)
    [handler] = root_logging.handlers
    assert type(handler.formatter) is formatter
    assert any(isinstance(f, RequestIdFilter) for f in handler.filters)
    assert root_logging.level == logging.WARNING
    assert logging.getLogger("httpx").level == logging.WARNING


def test_configure_logging_lets_library_lines_through_when_not_quiet(
    root_logging: logging.Logger,
) -> None:
    configure_logging("text", "debug", quiet_libraries=False)
    assert root_logging.level == logging.DEBUG
    assert logging.getLogger("httpx").level == logging.NOTSET  # the root's level: debug


def serve_without_tenants(tmp_path: Path, *flags: str) -> int:
    """`routecache [flags] serve` on a config that sets the log level but names no tenant."""
    from routecache.router.cli import main

    config = tmp_path / "no-tenants.toml"
    config.write_text('[logging]\nlevel = "warning"\n')
    return main([*flags, "serve", "--config", str(config)])


def test_serve_without_tenants_stops_in_one_line_and_exit_2(
    root_logging: logging.Logger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve_without_tenants(tmp_path) == 2
    assert capsys.readouterr().err.startswith("routecache: no tenants configured: ")


@pytest.mark.parametrize(
    ("flags", "level", "library_level"),
    [((), logging.WARNING, logging.WARNING), (("-v",), logging.DEBUG, logging.NOTSET)],
)
def test_serve_logs_at_the_configured_level_and_v_turns_on_debug_and_library_lines(
    root_logging: logging.Logger,
    tmp_path: Path,
    flags: tuple[str, ...],
    level: int,
    library_level: int,
) -> None:
    serve_without_tenants(tmp_path, *flags)  # configures logging, then stops: no tenants
    assert root_logging.level == level
    assert logging.getLogger("httpx").level == library_level


class Aborted(Exception):
    pass


class FakeContext(grpc.aio.ServicerContext[Any, Any]):
    """The servicer context as the RPC handlers use it: metadata, deadline, abort. The rest
    of grpc's abstract context is never called by them."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata(*self._metadata)

    def time_remaining(self) -> float:
        return 30.0

    def set_trailing_metadata(self, trailing_metadata: MetadataType) -> None:
        pass

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: MetadataType = ()
    ) -> Never:
        raise Aborted(details)

    async def abort_with_status(self, status: Status) -> Never:
        raise NotImplementedError

    async def read(self) -> Any:
        raise NotImplementedError

    async def write(self, message: Any) -> None:
        raise NotImplementedError

    async def send_initial_metadata(self, initial_metadata: MetadataType) -> None:
        raise NotImplementedError

    def set_code(self, code: grpc.StatusCode) -> None:
        raise NotImplementedError

    def set_details(self, details: str) -> None:
        raise NotImplementedError

    def set_compression(self, compression: grpc.Compression) -> None:
        raise NotImplementedError

    def disable_next_message_compression(self) -> None:
        raise NotImplementedError

    def peer(self) -> str:
        raise NotImplementedError

    def peer_identities(self) -> Iterable[bytes] | None:
        raise NotImplementedError

    def peer_identity_key(self) -> str | None:
        raise NotImplementedError

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        raise NotImplementedError


COMPLETE = pb.CompleteRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="q")])
RPCS = {
    "Complete": COMPLETE,
    "Feedback": pb.FeedbackRequest(response_id="unknown"),
    "Invalidate": pb.InvalidateRequest(all=True),
    "GetStats": pb.GetStatsRequest(top_n=3),
}


@pytest.mark.parametrize("rpc", list(RPCS))
async def test_every_rpc_adopts_the_callers_request_id(rpc: str) -> None:
    harness = make_harness()
    servicer = RouteCacheServicer(harness.service.pipeline)
    REQUEST_ID.set("-")
    context = FakeContext((("authorization", f"Bearer {KEYS['acme']}"),
                           ("x-request-id", f"req-{rpc}")))  # fmt: skip
    with contextlib.suppress(Aborted):  # a refused call logs under the request id too
        await getattr(servicer, rpc)(RPCS[rpc], context)
    assert REQUEST_ID.get() == f"req-{rpc}"  # what its log lines carry
    assert all(e["request_id"] == f"req-{rpc}" for e in harness.events.events)
    await harness.service.aclose()


async def test_a_stream_adopts_the_callers_request_id() -> None:
    harness = make_harness()
    servicer = RouteCacheServicer(harness.service.pipeline)
    REQUEST_ID.set("-")
    context = FakeContext((("authorization", f"Bearer {KEYS['acme']}"),
                           ("x-request-id", "req-stream")))  # fmt: skip
    replies = [reply async for reply in servicer.CompleteStream(COMPLETE, context)]
    assert replies[-1].HasField("final")
    assert REQUEST_ID.get() == "req-stream"
    assert harness.events.events  # the completion event, logged under the caller's id
    assert all(e["request_id"] == "req-stream" for e in harness.events.events)
    await harness.service.aclose()


async def test_a_grpc_stream_closed_part_way_is_paid_for_when_its_handler_is_closed() -> None:
    # The pipeline's stream settled at once when closed, but the servicer's and
    # error_mapping's generators around it did not close it: the spend and the request were
    # counted only when the event loop finalised the abandoned generators, some time later.
    harness = make_harness()
    servicer = RouteCacheServicer(harness.service.pipeline)
    context = FakeContext((("authorization", f"Bearer {KEYS['acme']}"),))
    request = pb.CompleteRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="stream " * 200)]
    )
    handler = servicer.CompleteStream(request, context)
    assert (await anext(handler)).HasField("delta")
    await handler.aclose()
    stats = await harness.service.pipeline.admin.stats(KEYS["acme"])
    assert (stats.requests, stats.cheap_calls) == (1, 1) and stats.cost_usd > 0
    await harness.service.aclose()


def test_operations_settings_fail_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"logging\.format"):
        load_settings(logging={"format": "yaml"})
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        load_settings(metrics={"port": 70000})
    with pytest.raises(ConfigError, match=r"cache\.feedback_penalty"):
        load_settings(cache={"feedback_penalty": 2})


def test_export_to_an_unwritable_place_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main

    log = tmp_path / "events.jsonl"
    log.write_text('{"kind": "completion", "ts": 1.0}\n')
    folder = tmp_path / "out"
    folder.mkdir()
    # pyarrow's IsADirectoryError was a traceback.
    assert main(["export-events", "--events", str(log), "--out", str(folder)]) == 2
    assert capsys.readouterr().err.startswith("routecache: export-events: ")


def test_export_of_a_field_with_values_of_two_types_names_it_in_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main

    log, out = tmp_path / "events.jsonl", tmp_path / "e.parquet"
    # A hand-edited line: parquet holds one type per column (pyarrow's ArrowInvalid traceback).
    log.write_text('{"kind": "completion", "ts": 1, "x": 1}\n'
                   '{"kind": "completion", "ts": 2, "x": "a"}\n')  # fmt: skip
    assert main(["export-events", "--events", str(log), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routecache: event log {log}: field 'x' holds values of different")
    assert err.count("\n") == 1 and not out.exists()


def test_export_events_reads_the_configs_event_log_and_keeps_events_since(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main

    log, out, config = tmp_path / "events.jsonl", tmp_path / "e.parquet", tmp_path / "rc.toml"
    log.write_text('{"kind": "old", "ts": 1.0}\n{"kind": "new", "ts": 100.0}\n')
    config.write_text(f'[events]\npath = "{log}"\n')
    assert main(["export-events", "--config", str(config), "--since", "50", "--out", str(out)]) == 0
    assert pd.read_parquet(out)["kind"].tolist() == ["new"]
    assert capsys.readouterr().out == f"1 events written to {out}\n"


def test_export_of_a_missing_log_names_it_in_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main

    missing = tmp_path / "events.jsonl"
    assert main(["export-events", "--events", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"routecache: event log not found: {missing}\n"


def test_export_of_a_log_that_is_not_utf8_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main

    log = tmp_path / "events.jsonl"
    log.write_bytes(b"\xff\xfe\n")
    assert main(["export-events", "--events", str(log), "--out", str(tmp_path / "e.pq")]) == 2
    assert capsys.readouterr().err.startswith(f"routecache: event log {log} is not UTF-8")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [(['{"kind": "a"}'], [("a", 0.0)]),
     (['{"kind": "a", "ts": 5.0}', '{"kind": "b"}', '{"kind": "c", "ts": null}'],
      [("b", 0.0), ("c", 0.0), ("a", 5.0)])],
    ids=["none has one", "some have one"],
)  # fmt: skip
def test_events_without_a_ts_are_exported_at_time_zero(
    tmp_path: Path, lines: list[str], expected: list[tuple[str, float]]
) -> None:
    # A log none of whose events had `ts` raised KeyError('ts'); read_events counts them as 0.
    # Next to events with one they were NaN, a time of NaT, and sorted last.
    log = tmp_path / "events.jsonl"
    log.write_text("".join(f"{line}\n" for line in lines))
    out = tmp_path / "e.parquet"
    assert export_log(log, out) == len(lines)
    frame = pd.read_parquet(out)
    assert list(zip(frame["kind"], frame["ts"], strict=True)) == expected
    assert frame["time"].notna().all()


def test_events_of_one_instant_keep_their_log_order(tmp_path: Path) -> None:
    # A completion and its feedback can share a ts; an unstable sort could swap them.
    log = tmp_path / "events.jsonl"
    log.write_text("".join(f'{{"kind": "k{i}", "ts": {i % 3}}}\n' for i in range(40)))
    kinds = events_frame(list(read_events(log)))["kind"].tolist()
    assert kinds == [f"k{i}" for t in range(3) for i in range(40) if i % 3 == t]


@pytest.mark.parametrize(("text", "seconds"), [("45s", 45), ("2w", 14 * 86400), ("1.5h", 5400)])
def test_since_durations_in_every_unit(text: str, seconds: float) -> None:
    assert parse_since(text, now=NOW) == pytest.approx(NOW - seconds)


@pytest.mark.usefixtures("machine_in_new_york")
def test_since_a_date_without_a_zone_is_utc_whatever_the_machines_zone() -> None:
    assert parse_since("2023-11-14T22:13:20", now=NOW) == pytest.approx(NOW)


def test_since_keeps_an_event_logged_at_that_very_second(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text(f'{{"kind": "a", "ts": {NOW - 1}}}\n{{"kind": "b", "ts": {NOW}}}\n')
    assert [e["kind"] for e in read_events(log, since=NOW)] == ["b"]


def test_events_after_a_torn_line_are_still_read(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text('{"kind": "a", "ts": 1.0}\n{"kind": "b", "ts": \n{"kind": "c", "ts": 3.0}\n')
    assert [e["kind"] for e in read_events(log)] == ["a", "c"]


def test_a_line_that_is_not_an_object_is_skipped(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text('[1, 2]\n"text"\n7\nnull\n{"kind": "a", "ts": 1.0}\n')
    assert [e["kind"] for e in read_events(log)] == ["a"]


def test_export_events_says_how_many_lines_it_skipped_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main

    # Before: the torn and timeless lines were dropped without a word; the export looked whole.
    log, out = tmp_path / "events.jsonl", tmp_path / "e.parquet"
    log.write_text(
        '{"kind": "a", "ts": 1.0}\n{"kind": "b", "ts": \n[1]\n\n'
        '{"kind": "c", "ts": "noon"}\n{"kind": "d", "ts": NaN}\n{"kind": "e"}\n'
    )
    assert main(["export-events", "--events", str(log), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out == f"2 events written to {out}\n"
    assert printed.err == (
        f"4 lines of {log} skipped: 2 not a JSON object (torn by a crash?), 2 with a ts that"
        " is no time\n"
    )


def test_an_export_that_skipped_nothing_prints_no_skip_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main

    log, out = tmp_path / "events.jsonl", tmp_path / "e.parquet"
    log.write_text('{"kind": "a", "ts": 1.0}\n\n')
    assert main(["export-events", "--events", str(log), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""


def test_a_line_python_cannot_read_as_json_is_counted_not_a_traceback(tmp_path: Path) -> None:
    # A number past Python's 4,300 digits, and nesting past its recursion, raised out of the
    # export as a traceback.
    log = tmp_path / "events.jsonl"
    log.write_text('{"n": ' + "9" * 5_000 + "}\n" + "[" * 100_000 + "\n" + '{"kind": "a"}\n')
    skipped = SkippedLines()
    assert [e["kind"] for e in read_events(log, skipped=skipped)] == ["a"]
    assert skipped.torn == 2


def test_reading_counts_a_line_torn_inside_a_character(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_bytes('{"kind": "a", "ts": 1.0}\n{"p": "5 €'.encode()[:-1] + b"\n")
    skipped = SkippedLines()
    assert [e["kind"] for e in read_events(log, skipped=skipped)] == ["a"]
    assert (skipped.torn, skipped.no_time) == (1, 0)


def test_a_log_saved_with_a_byte_order_mark_keeps_its_first_event(tmp_path: Path) -> None:
    # An editor's "UTF-8 with BOM" (a grades file written by hand): the first line was not
    # JSON, so its event was skipped as torn, by export-events and retrain alike.
    log = tmp_path / "grades.jsonl"
    log.write_text('{"kind": "a"}\n{"kind": "b"}\n', encoding="utf-8-sig")
    skipped = SkippedLines()
    assert [event["kind"] for _, event in event_lines(log, skipped)] == ["a", "b"]
    assert skipped.torn == 0


def test_export_orders_events_by_time(tmp_path: Path) -> None:
    # Logs of several replicas appended into one file interleave out of order.
    source, out = tmp_path / "events.jsonl", tmp_path / "events.parquet"
    source.write_text(
        '{"kind": "b", "ts": 2.0}\n{"kind": "a", "ts": 1.0}\n{"kind": "c", "ts": 3.0}\n'
    )
    export_log(source, out)
    assert pd.read_parquet(out)["kind"].tolist() == ["a", "b", "c"]


def test_the_in_memory_event_log_keeps_only_the_newest_events() -> None:
    log = InMemoryEventLog(max_events=2)  # a long-running process must not grow without limit
    for number in range(3):
        log.emit("completion", {"n": number})
    assert [e["n"] for e in log.events] == [1, 2]


def test_the_first_event_after_a_crash_is_not_lost_in_the_torn_line(tmp_path: Path) -> None:
    # A crash mid-write leaves a line with no newline; the restarted service appended its first
    # event to that line, which was then unreadable and skipped with it.
    source = tmp_path / "events.jsonl"
    write_log(source)
    with source.open("a") as torn:
        torn.write('{"kind": "completion", "ts": ')
    restarted = JsonlEventLog(source)
    restarted.emit("completion", {"response_id": "after-restart"})
    restarted.close()
    events = list(read_events(source))
    assert [e.get("response_id") for e in events] == ["r1", "r1", "after-restart"]


def test_a_line_torn_inside_a_character_is_skipped_like_any_torn_line(tmp_path: Path) -> None:
    # Events are written as UTF-8 (prompts in any language): a crash can cut a line inside a
    # character, which made the whole log "not UTF-8" and the export refuse every event.
    source, out = tmp_path / "events.jsonl", tmp_path / "events.parquet"
    write_log(source)
    with source.open("ab") as torn:
        torn.write('{"kind": "completion", "prompt": "5 €'.encode()[:-1])
    restarted = JsonlEventLog(source)
    restarted.emit("completion", {"response_id": "after-restart"})
    restarted.close()

    assert [e.get("response_id") for e in read_events(source)] == ["r1", "r1", "after-restart"]
    assert export_log(source, out) == 3


def test_each_event_is_in_the_file_as_soon_as_it_is_emitted(tmp_path: Path) -> None:
    # Offline jobs (export-events, a tailing collector) read the log while the service runs:
    # events held in the write buffer would be lost on a crash and missing from their reads.
    source = tmp_path / "events.jsonl"
    log = JsonlEventLog(source)
    try:
        log.emit("completion", {"response_id": "r1"})
        assert [e["response_id"] for e in read_events(source)] == ["r1"]
    finally:
        log.close()


def _descriptors_open_on(path: Path) -> int:
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if _links_to(fd, path))


def _links_to(fd: Path, path: Path) -> bool:
    try:
        return fd.readlink() == path
    except OSError:  # closed between the listing and the read (the listing's own descriptor)
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_closing_the_event_log_releases_its_file(tmp_path: Path) -> None:
    # Service.aclose closes it: a leaked descriptor per start keeps a rotated log on disk.
    source = tmp_path / "events.jsonl"
    log = JsonlEventLog(source)
    assert _descriptors_open_on(source) == 1
    log.close()
    assert _descriptors_open_on(source) == 0


def _full_disk() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_a_parquet_export_that_fails_mid_write_leaves_the_previous_out_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: written in place, so a full disk mid-write left a torn --out and the previous
    # export was gone.
    out = tmp_path / "e.parquet"
    out.write_bytes(b"the previous export")

    def to_parquet(_frame: pd.DataFrame, path: Any, **_: object) -> None:
        with contextlib.ExitStack() as stack:
            sink = path if hasattr(path, "write") else stack.enter_context(open(path, "wb"))
            sink.write(b"PAR1 half a table")
        raise _full_disk()

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    with pytest.raises(OSError, match="No space left"):
        write_parquet([{"kind": "completion", "ts": 1.0}], out, "event log x")
    assert out.read_bytes() == b"the previous export"
    assert list(tmp_path.iterdir()) == [out]  # no temp file left beside it


def test_a_jsonl_export_that_fails_mid_write_leaves_the_previous_out_whole(tmp_path: Path) -> None:
    out = tmp_path / "e.jsonl"
    out.write_text('{"kind": "previous"}\n', encoding="utf-8")

    def events() -> Iterator[dict[str, Any]]:
        yield {"kind": "completion", "ts": 1.0}
        raise _full_disk()

    with pytest.raises(OSError, match="No space left"):
        write_jsonl(events(), out)
    assert out.read_text("utf-8") == '{"kind": "previous"}\n'
    assert list(tmp_path.iterdir()) == [out]


def test_a_new_jsonl_export_is_its_owners_only_and_an_old_one_keeps_its_mode(
    tmp_path: Path,
) -> None:
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    old.write_text("", encoding="utf-8")
    old.chmod(0o640)  # the operator's choice, as O_TRUNC kept it
    for out in (new, old):
        assert write_jsonl([{"kind": "completion", "ts": 1.0}], out) == 1
        assert json.loads(out.read_text("utf-8")) == {"kind": "completion", "ts": 1.0}
    assert (new.stat().st_mode & 0o777, old.stat().st_mode & 0o777) == (0o600, 0o640)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--redis-url", "redis://localhost:1", "--tenant", "ac me"], "argument --tenant"),
        (["--redis-url", "redis://localhost:1", "--tenant", "x" * 65], "argument --tenant"),
        (["--events", "e.jsonl", "--redis-url", "redis://localhost:1"], "not allowed with"),
    ],
    ids=["a space", "too long", "events and redis"],
)
def test_export_refuses_a_tenant_no_stream_can_have_and_two_sources(
    capsys: pytest.CaptureFixture[str], extra: list[str], said: str
) -> None:
    # Before: a name no tenant can have exported 0 events, exit 0; --events with --redis-url
    # read the file and ignored the Redis flags without a word.
    from routecache.router.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export-events", *extra, "--out", "e.parquet"])
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


def test_export_of_a_file_with_a_tenant_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --tenant was ignored for a JSONL log, which holds every tenant's events.
    from routecache.router.cli import main

    log = tmp_path / "events.jsonl"
    log.write_text('{"kind": "completion", "ts": 1.0}\n', encoding="utf-8")
    argv = ["export-events", "--events", str(log), "--tenant", "acme"]
    assert main([*argv, "--out", str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routecache: --tenant ") and err.count("\n") == 1
    assert not (tmp_path / "e.parquet").exists()


def test_an_event_log_that_cannot_be_written_drops_and_counts_its_events_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: emit raised the OSError of a full disk (/dev/full: every write fails with
    # ENOSPC) into the pipeline, and every request, cache hits included, ended INTERNAL
    # although answered, paid and cached.
    log = JsonlEventLog(Path("/dev/full"))
    try:
        with caplog.at_level(logging.ERROR, logger="routecache.router.events"):
            for _ in range(3):
                log.emit("completion", {"response_id": "r1"})
        assert log.dropped == 3
        failures = [r for r in caplog.records if "cannot be written" in r.getMessage()]
        assert len(failures) == 1  # once per outage, not per event
    finally:
        log.close()


class _FailsOnce:
    """A log file whose first write lands half its bytes and then fails with ENOSPC."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("ab", buffering=0)
        self._failed = False

    def write(self, data: bytes) -> int:
        if not self._failed:
            self._failed = True
            self._file.write(data[: len(data) // 2])
            raise _full_disk()
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()


def test_the_event_after_a_failed_write_starts_its_own_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A write the disk cut short leaves half a line: the next event appended to it was lost
    # with it. It is dropped and counted, the next event is read, and the recovery logged.
    source = tmp_path / "events.jsonl"
    log = JsonlEventLog(source)
    log._file = _FailsOnce(source)  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="routecache.router.events"):
        log.emit("completion", {"response_id": "lost"})
        log.emit("completion", {"response_id": "after"})
    log.close()
    assert log.dropped == 1
    assert [e.get("response_id") for e in read_events(source)] == ["after"]
    assert any("written again" in r.getMessage() for r in caplog.records)


def test_an_event_json_cannot_encode_is_dropped_and_counted_not_raised(tmp_path: Path) -> None:
    # Like the Redis stream's sink: a value JSON has no form for goes as its text, and one it
    # cannot encode even so (a dict with a tuple key) is dropped and counted.
    source = tmp_path / "events.jsonl"
    log = JsonlEventLog(source)
    log.emit("completion", {"when": time, "odd": {(1, 2): "tuple key"}})
    log.emit("completion", {"response_id": "r1", "module": time})
    log.close()
    assert log.dropped == 1
    assert [e.get("module") for e in read_events(source)] == [str(time)]


def test_every_sink_gives_each_event_its_own_event_id(tmp_path: Path) -> None:
    # What lets a reader drop an event the Redis sink wrote twice (see read_events below).
    memory, source = InMemoryEventLog(), tmp_path / "events.jsonl"
    log = JsonlEventLog(source)
    for sink in (memory, log):
        sink.emit("completion", {"response_id": "r1"})
        sink.emit("completion", {"response_id": "r1"})
    log.close()
    for events in (list(memory.events), list(read_events(source))):
        ids = [e["event_id"] for e in events]
        assert len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_readers_drop_an_event_written_twice_and_keep_events_without_an_id(
    tmp_path: Path,
) -> None:
    # Before: an event the Redis sink wrote twice (a timed-out write Redis had applied, then
    # requeued) was exported, and counted in the notebook, twice: hits, savings, feedback.
    once = {"kind": "completion", "ts": NOW, "event_id": "a" * 32, "path": "exact_hit",
            "saved_usd": 0.01}  # fmt: skip
    older = {"kind": "completion", "ts": NOW + 1, "path": "exact_hit", "saved_usd": 0.01}
    source = tmp_path / "events.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in (once, once, older, older)))
    assert list(read_events(source)) == [once, older, older]  # an older log's events as they are
    assert len(events_frame([once, once, older])) == 2
    parquet = tmp_path / "events.parquet"
    pd.DataFrame([{**once, "time": 0}] * 2 + [{**older, "time": 0}]).to_parquet(parquet)
    assert len(load_events(parquet)) == 2


def test_an_event_holding_a_lone_surrogate_is_written_with_a_replacement_character(
    tmp_path: Path,
) -> None:
    # Before: a provider's error text ("\\ud83d" in its JSON) reached an event's message as a
    # lone surrogate; encoding the line raised UnicodeEncodeError outside the emit's handling.
    source = tmp_path / "events.jsonl"
    log = JsonlEventLog(source)
    log.emit("error", {"message": "HTTP 503: overloaded \ud83d", "upstream_failures": ["\udc00"],
                       "odd key \ud800": 1})  # fmt: skip
    log.close()
    assert log.dropped == 0
    (event,) = read_events(source)
    assert event["message"] == "HTTP 503: overloaded \ufffd"
    assert event["upstream_failures"] == ["\ufffd"] and event["odd key \ufffd"] == 1
    assert event_json({"whole pair": "\U0001f600"}) == '{"whole pair": "\U0001f600"}'


@pytest.mark.parametrize("fallback_answers", [True, False], ids=["fallback", "all-failed"])
async def test_a_provider_error_holding_a_lone_surrogate_is_logged_and_the_request_answered(
    tmp_path: Path, fallback_answers: bool
) -> None:
    # The reviewer's repro: the cheap provider's error text held a lone surrogate; the strong
    # answer was paid for and the caller got INTERNAL (or INTERNAL for UNAVAILABLE).
    harness = make_harness()
    log = JsonlEventLog(tmp_path / "events.jsonl")
    harness.service.pipeline._p.events = log
    harness.cheap.fail_with = UpstreamError("HTTP 503: overloaded \ud83d", retryable=True)
    if not fallback_answers:
        harness.strong.fail_with = UpstreamError("HTTP 503: down \udc00", retryable=True)
    try:
        if fallback_answers:
            done = await harness.service.pipeline.complete(_ask("q"), KEYS["acme"])
            assert done.model == "strong-model"
        else:
            with pytest.raises(Unavailable):
                await harness.service.pipeline.complete(_ask("q"), KEYS["acme"])
    finally:
        await harness.service.aclose()
        log.close()
    assert log.dropped == 0
    logged = json.dumps(list(read_events(tmp_path / "events.jsonl")), ensure_ascii=False)
    assert "overloaded \ufffd" in logged


async def test_requests_are_answered_while_the_event_log_cannot_be_written() -> None:
    # The reviewer's repro: with the log on a full disk both requests (a miss, then an exact
    # hit) ended INTERNAL; the metrics counted them as errors.
    harness = make_harness()
    pipeline = harness.service.pipeline
    log = JsonlEventLog(Path("/dev/full"))
    pipeline._p.events = log
    try:
        first = await pipeline.complete(_ask("what is a cache"), KEYS["acme"])
        second = await pipeline.complete(_ask("what is a cache"), KEYS["acme"])
    finally:
        await harness.service.aclose()
        log.close()
    assert (first.cache.outcome, second.cache.outcome) == ("miss", "exact")
    assert len(harness.cheap.calls) == 1
    assert log.dropped >= 2


def test_the_jsonl_event_logs_drops_are_a_metric(tmp_path: Path) -> None:
    # events_dropped was watched only for the Redis stream: the JSONL log's drops showed in
    # no metric.
    settings = unit_settings(service={"events": {"path": "/dev/full"}})
    telemetry = PrometheusTelemetry()
    acquired = Acquired()
    events = open_events(settings, Overrides(telemetry=telemetry), acquired, telemetry)
    assert events is not None
    events.emit("completion", {})
    assert telemetry.registry.get_sample_value("routecache_events_dropped_total") == 1
    assert isinstance(events, JsonlEventLog)
    events.close()


def test_an_unreachable_redis_event_stream_never_shows_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from routecache.router.cli import main
    from tests.redis_fixture import free_port

    port = free_port()  # nothing listens there
    for url in (f"redis://127.0.0.1:{port}/0?password=s3cret",
                f"redis://user:s3cret@127.0.0.1:{port}/0"):  # fmt: skip
        out = str(tmp_path / "e.parquet")
        assert main(["export-events", "--redis-url", url, "--tenant", "acme", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err == f"routecache: cannot reach Redis at redis://127.0.0.1:{port}/0\n"
