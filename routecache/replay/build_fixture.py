"""Build the replay upstream's recordings from the RouteLLM routing data.

    python -m routecache.replay.build_fixture \
        --routing-dir ../shared/data/routing --out routecache/replay/data/gsm8k_recorded.jsonl

Only the GSM8K rows carry the models' real answers, so only they become recordings.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from routecache.atomic_file import replacing
from routecache.replay.recordings import numbered_json_rows, prompt_key

SPLITS = ("routing_train.jsonl", "routing_dev.jsonl")
KEPT_FIELDS = ("prompt", "weak_response", "strong_response")
DEFAULT_OUT = Path(__file__).parent / "data" / "gsm8k_recorded.jsonl"


def recorded_rows(routing_dir: Path) -> Iterator[dict[str, str]]:
    """Every GSM8K row of the train and dev splits, reduced to the prompt and both answers.

    A prompt recorded twice (equal once trimmed) is refused, as Recordings refuses it: written
    out, it would make recordings that do not load."""
    first_at: dict[str, str] = {}
    for split in SPLITS:
        text = (routing_dir / split).read_text(encoding="utf-8")
        for number, row in numbered_json_rows(text, source=split):
            if row.get("source") != "gsm8k":
                continue
            kept = {name: row.get(name) for name in KEPT_FIELDS}
            missing = [name for name, value in kept.items() if not isinstance(value, str)]
            if missing:
                raise ValueError(f"{split}:{number}: GSM8K row lacks {', '.join(missing)}")
            key, where = prompt_key(str(kept["prompt"])), f"{split}:{number}"
            if (earlier := first_at.setdefault(key, where)) != where:
                raise ValueError(f"{where}: the prompt {key!r} again (first at {earlier})")
            yield {name: str(value) for name, value in kept.items()}


def write_rows(rows: Iterator[dict[str, str]], out: Path) -> int:
    """Write the rows to `out` only once all were read: a bad routing file raises with `out`
    (by default the packaged recordings) untouched, not emptied. Synced: nor does a power loss
    leave it empty."""
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with replacing(out) as sink:
        for row in rows:
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the replay recordings from the RouteLLM GSM8K rows."
    )
    parser.add_argument(
        "--routing-dir",
        type=Path,
        required=True,
        help="folder holding routing_train.jsonl and routing_dev.jsonl",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file to write")
    args = parser.parse_args(argv)
    try:
        count = write_rows(recorded_rows(args.routing_dir), args.out)
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        print(f"build_fixture: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} recordings to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
