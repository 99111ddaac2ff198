"""`routecache serve` and SIGTERM/SIGINT while the service is still starting (models, index
and snapshot loading: seconds to minutes): the start is cancelled and the process exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from routecache.router import bootstrap
from routecache.router.auth import hash_api_key
from routecache.router.cli import main

# Longer than the signal takes to land: a start still running then was not stopped by it.
START_SECONDS = 5.0


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(
        f"""
[server]
port = 0
[[tenants]]
name = "acme"
api_key_sha256 = ["{hash_api_key("dev-key-acme")}"]
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_start_cancels_it_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    # Before: the handler only set the stop event, which nothing awaited until the start was
    # over: the service went on loading (and then printed "serving") before it stopped.
    started = threading.Event()
    outcome: list[str] = []

    async def slow_start(settings: Any, overrides: Any = None) -> Any:
        started.set()
        try:
            await asyncio.sleep(START_SECONDS)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("finished")
        raise RuntimeError("the start was not stopped by the signal")

    def send_when_started() -> None:
        if started.wait(10):
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(bootstrap, "start_service", slow_start)
    threading.Thread(target=send_when_started, daemon=True).start()
    assert main(["serve", "--config", str(_config(tmp_path))]) == 0
    assert outcome == ["cancelled"]
