"""Replacing a file whole: the old file or the new one, never a torn one, and no temp left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from routecache.atomic_file import publish_file, replacing, replacing_bytes
from tests.unit.conftest import record_fsyncs, record_synced


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_new_text_replaces_the_file_and_no_temp_file_is_left(tmp_path: Path) -> None:
    path = tmp_path / "file.json"
    path.write_text("old")
    with replacing(path) as out:
        out.write("new, ")
        assert path.read_text() == "old"  # readers see the old file until the block ends
        out.write("whole")
    assert path.read_text() == "new, whole"
    assert os.listdir(tmp_path) == ["file.json"]


# Ctrl-C too: build_fixture reads the routing data inside the block, for minutes.
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt("disk full")])
def test_a_write_that_fails_midway_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, error: BaseException
) -> None:
    path = tmp_path / "file.json"
    path.write_text("old")
    with pytest.raises(type(error), match="disk full"), replacing(path) as out:
        out.write("half of the new")
        raise error
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.json"]


def test_the_file_is_synced_then_renamed_then_its_folder_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file.json"
    synced = record_fsyncs(monkeypatch, path)
    with replacing(path) as out:
        out.write("new")
    assert synced == [(False, False), (True, True)]


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_a_mode_is_set_exactly_even_over_a_stale_temp_file_and_past_the_umask(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "file.json"
    stale = tmp_path / "file.json.tmp"  # left by a crash, readable by all, longer
    stale.write_text("stale text longer than the new")
    os.chmod(stale, 0o644)
    previous = os.umask(0o077)  # takes the group bits of 0o640 at creation
    try:
        with replacing(path, mode=mode) as out:
            out.write("new")
    finally:
        os.umask(previous)
    assert (_mode(path), path.read_text()) == (mode, "new")


def test_like_existing_keeps_the_files_mode_and_owner_and_a_new_file_takes_the_mode(
    tmp_path: Path,
) -> None:
    path = tmp_path / "file.json"
    with replacing(path, mode=0o600, like_existing=True) as out:
        out.write("first")
    assert _mode(path) == 0o600
    os.chmod(path, 0o644)
    owner = (path.stat().st_uid, path.stat().st_gid)
    if os.geteuid() == 0:  # only root may give a file away: the owner is kept only by root
        owner = (65534, 65534)
        os.chown(path, *owner)
    with replacing(path, mode=0o600, like_existing=True) as out:
        out.write("second")
    replaced = path.stat()
    assert (_mode(path), replaced.st_uid, replaced.st_gid) == (0o644, *owner)
    assert path.read_text() == "second"


def test_without_a_mode_the_file_is_as_the_umask_allows(tmp_path: Path) -> None:
    path = tmp_path / "file.json"
    previous = os.umask(0o027)
    try:
        with replacing(path) as out:
            out.write("new")
    finally:
        os.umask(previous)
    assert _mode(path) == 0o640


def test_bytes_replace_a_file_as_text_does_synced_and_a_failed_write_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file.npz"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), replacing_bytes(path) as out:
        out.write(b"half")
        raise OSError("disk full")
    assert (path.read_bytes(), os.listdir(tmp_path)) == (b"old", ["file.npz"])
    synced = record_fsyncs(monkeypatch, path)
    with replacing_bytes(path, mode=0o600) as out:
        out.write(b"\x00new")
    assert (path.read_bytes(), _mode(path), os.listdir(tmp_path)) == (
        b"\x00new", 0o600, ["file.npz"]
    )  # fmt: skip
    assert synced == [(False, True), (True, True)]


@pytest.mark.parametrize("text", [True, False])
def test_the_file_is_synced_with_all_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: bool
) -> None:
    # Synced before the writes buffered in Python reached it, the file could be published
    # with only part of them on disk.
    path = tmp_path / "file"
    synced = record_synced(monkeypatch)
    if text:
        with replacing(path) as out:
            out.write("new \u00e9")
    else:
        with replacing_bytes(path) as binary:
            binary.write(b"new \xc3\xa9")
    assert synced[0].st_size == len(b"new \xc3\xa9") == path.stat().st_size


def test_a_file_written_elsewhere_is_synced_then_renamed_over_the_path_then_its_folder_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # For writers that take a path, not a file (ONNX exporters): written in a scratch folder.
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"old")
    (tmp_path / "scratch").mkdir()
    written = tmp_path / "scratch" / "graph.onnx"
    written.write_bytes(b"new")
    new_file = written.stat().st_ino
    synced = record_synced(monkeypatch)
    before_rename = record_fsyncs(monkeypatch, written)
    publish_file(written, path)
    assert path.read_bytes() == b"new" and not written.exists()
    # The new file whole before it takes the name, then the folder that holds its new name
    # (not the scratch folder).
    assert [s.st_ino for s in synced] == [new_file, tmp_path.stat().st_ino]
    assert synced[0].st_size == 3 and before_rename == [(False, True), (True, False)]
