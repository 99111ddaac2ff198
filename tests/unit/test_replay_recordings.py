"""The replay upstream's recorded answers: reading them, looking them up, and stand-ins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routecache.replay.recordings import Recordings, synthetic_answer, weak_breaks_json
from tests.unit.conftest import record_fsyncs


def row(prompt: str, weak: str = "weak says", strong: str = "strong says") -> str:
    return json.dumps({"prompt": prompt, "weak_response": weak, "strong_response": strong},
                      ensure_ascii=False)  # fmt: skip


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "recorded.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_file_is_read_as_utf8_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, row("Wie viel kostet es?", strong="Es kostet 5 €."), "", "   ",
                 row("second"))  # fmt: skip
    recordings = Recordings.load(path)
    assert len(recordings) == 2
    assert recordings.answer("strong", "Wie viel kostet es?") == "Es kostet 5 €."


def test_an_answer_holding_a_unicode_line_separator_is_one_recording(tmp_path: Path) -> None:
    # JSON written with ensure_ascii=False (as build_fixture writes) keeps U+2028, U+2029 and
    # NEL raw inside strings: only "\n" ends a JSONL line.
    answer = "First line\u2028second\u2029third\x85fourth\x1cend"
    recordings = Recordings.load(write(tmp_path, row("p", strong=answer), row("q")))
    assert recordings.answer("strong", "p") == answer
    with pytest.raises(ValueError, match=r"recorded\.jsonl:3: not JSON"):
        Recordings.load(write(tmp_path, row("p", strong=answer), "", "{not json"))


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ("[1, 2]", "recorded.jsonl:2: expected a JSON object"),
        ("{not json", "recorded.jsonl:2: not JSON"),
        ("[" * 100_000, "recorded.jsonl:2: not JSON Python can read"),
        ('{"n": ' + "9" * 5_000 + "}", "recorded.jsonl:2: not JSON Python can read"),
        ('{"prompt": "p", "weak_response": "w"}', "recorded.jsonl:2: needs string prompt"),
        ('{"prompt": "p", "weak_response": 1, "strong_response": "s"}', "recorded.jsonl:2: needs"),
    ],
    ids=["array", "not-json", "too-deep", "too-many-digits", "no-strong", "number-weak"],
)
def test_a_bad_line_is_refused_naming_its_number(tmp_path: Path, second: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Recordings.load(write(tmp_path, row("first"), second))


def test_two_recordings_of_one_prompt_once_trimmed_are_refused_naming_both(
    tmp_path: Path,
) -> None:
    # Looked up by the trimmed prompt, the later recording would silently replace the earlier.
    with pytest.raises(ValueError, match=r"recorded\.jsonl:3 .*'What is 2 \+ 2\?'.* line 1\W"):
        Recordings.load(write(tmp_path, row("What is 2 + 2?"), row("other"),
                              row(" What is 2 + 2?\n")))  # fmt: skip


def test_a_bad_recording_is_named_by_its_line_past_blank_lines(tmp_path: Path) -> None:
    # Before: numbered among the recordings, so the fourth line was "recording 2".
    bad = '{"prompt": "p", "weak_response": "w"}'
    with pytest.raises(ValueError, match=r"/recorded\.jsonl:4: needs string prompt"):
        Recordings.load(write(tmp_path, row("first"), "", "", bad))
    with pytest.raises(ValueError, match=r"/recorded\.jsonl:5 records the prompt 'a' again "
                       r"\(first at line 2;"):  # fmt: skip
        Recordings.load(write(tmp_path, "", row("a"), "", "", row("a ")))


def test_prompts_are_matched_without_their_surrounding_whitespace() -> None:
    recordings = Recordings({"  What is 2 + 2?\n": {"weak": "4", "strong": "four"}})
    for asked in ("What is 2 + 2?", " What is 2 + 2? "):
        assert asked in recordings
        assert recordings.recorded("strong", asked) == "four"
    assert list(recordings.prompts()) == ["What is 2 + 2?"]
    assert 42 not in recordings and "What is 2 + 3?" not in recordings


def test_a_stand_in_answer_names_the_prompts_opening_words() -> None:
    answer = synthetic_answer("weak", "  How far is the moon from the earth today?  ")
    assert "“How far is the moon from”" in answer


def test_different_unknown_prompts_get_different_stand_ins() -> None:
    prompts = [f"Same opening words for each one, question {n}" for n in range(50)]
    answers = {synthetic_answer("strong", prompt) for prompt in prompts}
    assert len(answers) >= 45  # a few of the 3 x 3 x 1000 stand-ins may coincide


def test_a_prompt_with_no_words_gets_a_stand_in_about_this() -> None:
    assert "“this”" in synthetic_answer("strong", "  ?!  ")


def test_whether_the_weak_model_breaks_json_ignores_surrounding_whitespace() -> None:
    prompts = [f"question {n}" for n in range(40)]
    assert {weak_breaks_json(p) for p in prompts} == {True, False}  # about half each
    for prompt in prompts:
        assert weak_breaks_json(f"  {prompt}\n") == weak_breaks_json(prompt)


def build(routing_dir: Path, out: Path) -> int:
    from routecache.replay.build_fixture import main

    return main(["--routing-dir", str(routing_dir), "--out", str(out)])


def routing_split(routing_dir: Path, *lines: str) -> None:
    """Write routing_train.jsonl (and an empty dev split) the way the RouteLLM data has them."""
    routing_dir.mkdir()
    (routing_dir / "routing_train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (routing_dir / "routing_dev.jsonl").write_text("", encoding="utf-8")


GSM8K_ROW = '{"source": "gsm8k", "prompt": "p", "weak_response": "w", "strong_response": "s"}'


def test_building_the_recordings_keeps_only_the_gsm8k_rows_and_counts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gsm8k = json.loads(GSM8K_ROW)
    routing_split(tmp_path / "routing", json.dumps(gsm8k), json.dumps(gsm8k | {"source": "mmlu"}))
    out = tmp_path / "new" / "recorded.jsonl"  # its folder is made

    assert build(tmp_path / "routing", out) == 0

    assert Recordings.load(out).answer("strong", "p") == "s" and len(Recordings.load(out)) == 1
    assert capsys.readouterr().out == f"wrote 1 recordings to {out}\n"


def test_built_recordings_are_synced_before_and_after_replacing_the_old_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # By default they replace the packaged recordings: unsynced, a power loss could leave an
    # empty file there, and a replay upstream that answers nothing.
    routing_split(tmp_path / "routing", GSM8K_ROW)
    out = write(tmp_path, row("old"))
    synced = record_fsyncs(monkeypatch, out)

    assert build(tmp_path / "routing", out) == 0

    assert synced == [(False, True), (True, True)]
    assert Recordings.load(out).answer("strong", "p") == "s"
    assert sorted(p.name for p in out.parent.iterdir()) == ["recorded.jsonl", "routing"]


@pytest.mark.parametrize(
    ("line", "message"),
    [(None, "No such file"), ("{not json", "routing_train.jsonl:1: not JSON"),
     ("[1]", "routing_train.jsonl:1: expected a JSON object"),
     ('{"source": "gsm8k", "prompt": "p"}', "routing_train.jsonl:1: GSM8K row lacks"),
     (GSM8K_ROW + "\n" + GSM8K_ROW.replace('"p"', '" p "'),
      "routing_train.jsonl:2: the prompt 'p' again (first at routing_train.jsonl:1")],
    ids=["missing", "not JSON", "not an object", "no answers", "prompt twice"],
)  # fmt: skip
def test_building_from_bad_routing_data_is_one_line_and_keeps_the_old_recordings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str | None, message: str
) -> None:
    if line is not None:
        routing_split(tmp_path / "routing", line)
    out = write(tmp_path, row("kept"))

    assert build(tmp_path / "routing", out) == 2

    err = capsys.readouterr().err
    assert err.startswith("build_fixture: ") and message in err and err.count("\n") == 1
    assert Recordings.load(out).answer("strong", "kept") == "strong says"
