"""Input files of the offline jobs: read line by line, and a bad one reported, not raised."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


class DataFileError(ValueError):
    """An input file of an offline job is missing, unreadable or not in its format; the jobs
    print the message and exit 2 (a traceback would bury which file and line is wrong)."""


def exits_2_on_data_error(
    job: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """A job's `run`, with a bad input file reported in one line and exit code 2."""

    @functools.wraps(job)
    def run(args: argparse.Namespace) -> int:
        try:
            return job(args)
        except DataFileError as error:
            print(f"routecache: {error}", file=sys.stderr)
            return 2

    return run


def distinct_files(paths: Sequence[Path]) -> list[Path]:
    """`paths` less each that names a file already listed (`--data f --data ./f`, a link):
    read twice, every row or event would count twice, and each training row would have a twin
    in the neighbour bank."""
    seen: set[Path] = set()
    kept: list[Path] = []
    for path in paths:
        if (resolved := path.resolve()) not in seen:
            seen.add(resolved)
            kept.append(path)
    return kept


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file, numbered from 1."""
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield number, line
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: cannot read it ({exc})") from exc


def writable_folder(folder: Path, flag: str) -> None:
    """DataFileError unless `folder` is (or can be made) a folder this process may write in."""
    if folder.exists() and not folder.is_dir():
        raise DataFileError(f"{flag} {folder}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataFileError(f"{flag} {folder}: cannot make the folder ({exc.strerror})") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataFileError(f"{flag} {folder}: the folder is not writable")
