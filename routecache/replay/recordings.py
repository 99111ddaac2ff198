"""Recorded model answers, looked up by model role and prompt, with deterministic stand-ins.

Determinism matters more than realism here: tests and benchmarks run the replay upstream in
other processes, so every choice derives from SHA-256 of its inputs, never from `hash()`
(salted per process) or a clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

ModelRole = Literal["weak", "strong"]
MODEL_ROLES: tuple[ModelRole, ...] = get_args(ModelRole)
PACKAGED_RECORDINGS = "gsm8k_recorded.jsonl"

_OPENINGS: Mapping[ModelRole, tuple[str, ...]] = {
    "weak": (
        "Sure! Let's think about this.",
        "Here is a short answer.",
        "Good question.",
    ),
    "strong": (
        "Let's work through this step by step.",
        "Here is a careful answer.",
        "To answer this, consider the key facts first.",
    ),
}
_BODIES = (
    "The question asks about {topic}. Taking the details into account, the result is {number}.",
    "Looking at {topic}, the main point is that the figures combine to {number}.",
    "Breaking down {topic} into parts and combining them gives {number}.",
)


def digest(*parts: str) -> bytes:
    """A process-independent fingerprint of the parts (unambiguous: NUL-separated)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).digest()


def prompt_key(prompt: str) -> str:
    return prompt.strip()


def synthetic_answer(role: ModelRole, prompt: str) -> str:
    """A plausible answer for a prompt nobody recorded, the same on every run and machine."""
    seed = digest("answer", role, prompt_key(prompt))
    words = prompt_key(prompt).split()
    topic = " ".join(words[:6]).rstrip("?.!,:;") or "this"
    opening = _OPENINGS[role][seed[0] % len(_OPENINGS[role])]
    body = _BODIES[seed[1] % len(_BODIES)]
    number = int.from_bytes(seed[2:4], "big") % 1000
    return f"{opening} {body.format(topic=f'“{topic}”', number=number)}"


def weak_breaks_json(prompt: str) -> bool:
    """Whether the weak model ignores JSON mode for this prompt: about half of all prompts."""
    return digest("json", prompt_key(prompt))[0] % 2 == 1


class Recordings:
    """(model role, prompt) → answer, keyed on the whitespace-stripped prompt."""

    def __init__(self, answers: Mapping[str, Mapping[ModelRole, str]]) -> None:
        self._answers = {prompt_key(prompt): dict(by_role) for prompt, by_role in answers.items()}

    @classmethod
    def from_rows(
        cls, rows: Iterable[tuple[int, Mapping[str, object]]], *, source: str
    ) -> Recordings:
        """Rows with their line numbers in `source`. Raises ValueError naming SOURCE:LINE for a
        row that is not a recording, and for a second recording of a prompt (equal once
        trimmed): it would silently replace the first. Lines, not rows: blank lines are
        skipped, and "recording 2" sent a reader to the wrong line."""
        answers: dict[str, dict[ModelRole, str]] = {}
        first_line: dict[str, int] = {}
        for number, row in rows:
            prompt, weak, strong = (
                row.get(name) for name in ("prompt", "weak_response", "strong_response")
            )
            if not (isinstance(prompt, str) and isinstance(weak, str) and isinstance(strong, str)):
                raise ValueError(
                    f"{source}:{number}: needs string prompt, weak_response and strong_response"
                )
            key = prompt_key(prompt)
            if (earlier := first_line.setdefault(key, number)) != number:
                raise ValueError(
                    f"{source}:{number} records the prompt {key!r} again (first at line "
                    f"{earlier}; prompts are compared without surrounding whitespace)"
                )
            answers[key] = {"weak": weak, "strong": strong}
        return cls(answers)

    @classmethod
    def load(cls, path: Path | None = None) -> Recordings:
        """Read a recordings JSONL file; by default the GSM8K recordings shipped in the package."""
        if path is None:
            text = (
                resources.files("routecache.replay")
                .joinpath("data", PACKAGED_RECORDINGS)
                .read_text(encoding="utf-8")
            )
        else:
            text = path.read_text(encoding="utf-8")
        source = str(path or PACKAGED_RECORDINGS)
        return cls.from_rows(numbered_json_rows(text, source=source), source=source)

    def __len__(self) -> int:
        return len(self._answers)

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and prompt_key(prompt) in self._answers

    def prompts(self) -> Iterator[str]:
        return iter(self._answers)

    def recorded(self, role: ModelRole, prompt: str) -> str | None:
        by_role = self._answers.get(prompt_key(prompt))
        return None if by_role is None else by_role.get(role)

    def answer(self, role: ModelRole, prompt: str) -> str:
        """The recorded answer, or a deterministic stand-in for an unknown prompt."""
        recorded = self.recorded(role, prompt)
        return synthetic_answer(role, prompt) if recorded is None else recorded


def numbered_json_rows(text: str, *, source: str) -> Iterator[tuple[int, dict[str, object]]]:
    """Each JSON object of a JSONL text with its line number; a line that is not one raises
    ValueError naming `source` and the line. Blank lines are skipped."""
    # Only "\n" ends a line: splitlines() also splits at U+2028, NEL and the like, which
    # JSON written with ensure_ascii=False keeps raw inside an answer's string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number}: not JSON ({exc.msg})") from exc
        except (ValueError, RecursionError) as exc:  # past Python's digits or nesting
            raise ValueError(f"{source}:{number}: not JSON Python can read ({exc})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{source}:{number}: expected a JSON object")
        yield number, row
