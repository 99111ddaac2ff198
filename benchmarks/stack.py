"""Start the replay upstream and `routecache serve` as child processes on free loopback ports.

Benchmarks drive the server from another process, as a backend service would, so the load
generator's CPU shows up as a separate process instead of inside the server's event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from routecache.router.auth import hash_api_key

API_KEY = "bench-key"
_LISTENING = re.compile(r"serving on [\d.]+:(\d+)")
_REPLAY = re.compile(r"http://127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class RunningStack:
    target: str
    server_pid: int
    api_key: str = API_KEY


def _wait_for(process: subprocess.Popen[str], pattern: re.Pattern[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if match := pattern.search(line):
            return match.group(1)
    raise TimeoutError(f"{process.args!r} did not start within {timeout} s")


def upstream_toml(base_url: str) -> str:
    """Both tiers on one replay upstream, at the list prices of the recorded models."""
    return f"""
[upstream.cheap]
base_url = "{base_url}"
model = "mixtral-8x7b-instruct"
input_usd_per_mtok = 0.6
output_usd_per_mtok = 0.6

[upstream.strong]
base_url = "{base_url}"
model = "gpt-4-1106-preview"
input_usd_per_mtok = 10.0
output_usd_per_mtok = 30.0
"""


def _config(replay_port: str, extra_toml: str) -> str:
    return f"""
[server]
port = 0
{upstream_toml(f"http://127.0.0.1:{replay_port}/v1")}
{extra_toml}
[[tenants]]
name = "bench"
api_key_sha256 = ["{hash_api_key(API_KEY)}"]
"""


@contextlib.contextmanager
def running_stack(
    extra_toml: str = "", replay_args: tuple[str, ...] = ()
) -> Iterator[RunningStack]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    python = [sys.executable, "-m", "routecache"]
    with tempfile.TemporaryDirectory() as scratch:
        replay = subprocess.Popen(
            [*python, "replay-upstream", "--port", "0", *replay_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        server: subprocess.Popen[str] | None = None
        try:
            replay_port = _wait_for(replay, _REPLAY, 60)
            config = Path(scratch) / "bench.toml"
            config.write_text(_config(replay_port, extra_toml))
            server = subprocess.Popen(
                [*python, "serve", "--config", str(config)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            )  # fmt: skip
            port = _wait_for(server, _LISTENING, 180)
            yield RunningStack(f"127.0.0.1:{port}", server.pid)
        finally:
            for process in (server, replay):
                if process is not None:
                    process.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(15)
                    process.kill()
