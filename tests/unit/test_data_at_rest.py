"""Prompts and answers at rest (the snapshot and the JSONL event log) are readable by the
service's user only."""

import os
import stat
from pathlib import Path

import pytest

from routecache.cache.snapshot import save_snapshot
from routecache.router.events import JsonlEventLog


def _others_bits(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode) & 0o077


def test_a_snapshot_is_private_even_over_a_stale_world_readable_temp_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cache.jsonl"
    leftover = path.with_name(path.name + ".tmp")
    leftover.write_text("")
    os.chmod(leftover, 0o644)
    save_snapshot([], path)
    assert _others_bits(path) == 0


def test_a_new_snapshot_file_is_created_private_not_made_so_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Created readable by others, prompts would be open to them until the mode was fixed.
    monkeypatch.setattr(os, "fchmod", lambda descriptor, mode: None)
    path = tmp_path / "cache.jsonl"
    save_snapshot([], path)
    assert _others_bits(path) == 0


def test_a_new_event_log_is_private(tmp_path: Path) -> None:
    log = JsonlEventLog(tmp_path / "events" / "events.jsonl")
    log.emit("completion", {"prompt": "secret question"})
    log.close()
    assert _others_bits(tmp_path / "events" / "events.jsonl") == 0
