"""SIGTERM during a bounded load: does every accepted request complete, and does it exit 0?

Starts the replay upstream (with added latency, so requests are in flight) and
`python -m routecache serve` as subprocesses on loopback, sends --requests requests at once,
waits until the server has accepted all of them (its /metrics: in flight + finished), sends
SIGTERM while they are in flight, then a few late requests, and prints what happened as JSON.

    python benchmarks/sigterm_drain.py --requests 64 --upstream-latency-ms 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.stack import upstream_toml
from routecache.client import RouteCacheClient, chat_request
from routecache.router.auth import hash_api_key

API_KEY = "drain-test-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config_text(upstream_port: int, events: Path, grace_seconds: float) -> str:
    base = f"http://127.0.0.1:{upstream_port}/v1"
    return f"""
[server]
host = "127.0.0.1"
port = 0
grace_seconds = {grace_seconds}

[metrics]
port = 0

[logging]
format = "json"

[events]
path = "{events}"

{upstream_toml(base)}
[[tenants]]
name = "load"
api_key_sha256 = ["{hash_api_key(API_KEY)}"]
"""


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def read_ports(serve: subprocess.Popen[str], deadline: float) -> tuple[int, int]:
    """The gRPC and metrics ports from serve's start line (both were asked as port 0)."""
    assert serve.stdout is not None
    while time.monotonic() < deadline:
        line = serve.stdout.readline()
        if not line:
            raise RuntimeError(f"serve exited early with code {serve.wait()}")
        if match := re.search(r"serving on [\d.]+:(\d+), metrics on :(\d+)", line):
            return int(match.group(1)), int(match.group(2))
    raise TimeoutError("serve did not start")


def scrape(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    totals: defaultdict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


async def until_all_accepted(metrics_port: int, n: int, deadline: float) -> float:
    """Waits until every request reached the pipeline; returns how many are still in flight."""
    while time.monotonic() < deadline:
        totals = await asyncio.to_thread(scrape, metrics_port)
        in_flight = totals.get("routecache_in_flight_requests", 0.0)
        if in_flight + totals.get("routecache_requests_total", 0.0) >= n:
            return in_flight
        await asyncio.sleep(0.05)
    raise TimeoutError("the server did not accept every request in time")


async def call(client: RouteCacheClient, prompt: str) -> str:
    try:
        await client.complete(chat_request(prompt, no_cache=True, no_store=True))
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def drive(grpc_port: int, metrics_port: int, serve: subprocess.Popen[str],
                args: argparse.Namespace) -> dict[str, object]:  # fmt: skip
    async with RouteCacheClient(f"127.0.0.1:{grpc_port}", API_KEY, timeout_seconds=60) as client:
        prompts = [f"Load question {i}: what is {i} plus {i * 7}?" for i in range(args.requests)]
        calls = [asyncio.create_task(call(client, p)) for p in prompts]
        in_flight = await until_all_accepted(metrics_port, args.requests, time.monotonic() + 120)
        sigterm_at = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        await asyncio.sleep(args.late_delay_s)
        late = await asyncio.gather(*(call(client, f"late {i}") for i in range(args.late)))
        accepted = await asyncio.gather(*calls)
    code = await asyncio.to_thread(serve.wait, 120)
    return {
        "requests": args.requests,
        "in_flight_at_sigterm": int(in_flight),
        "accepted_outcomes": dict(Counter(accepted)),
        "late_outcomes": dict(Counter(late)),
        "exit_code": code,
        "sigterm_to_exit_s": round(time.monotonic() - sigterm_at, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--upstream-latency-ms", type=int, default=2000)
    parser.add_argument("--grace-seconds", type=float, default=30.0)
    parser.add_argument("--late", type=int, default=4, help="requests sent after SIGTERM")
    parser.add_argument("--late-delay-s", type=float, default=0.3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="routecache-drain-"))
    events = workdir / "events.jsonl"
    upstream_port = free_port()
    python = [sys.executable, "-m", "routecache"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    replay = subprocess.Popen(
        [*python, "replay-upstream", "--port", str(upstream_port),
         "--latency-ms", str(args.upstream_latency_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    config = workdir / "config.toml"
    config.write_text(config_text(upstream_port, events, args.grace_seconds))
    log = (workdir / "serve.log").open("w")
    serve = subprocess.Popen([*python, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                             stderr=log, text=True, env=env)  # fmt: skip
    started = time.monotonic()
    try:
        deadline = started + 180
        wait_for_port(upstream_port, deadline)
        grpc_port, metrics_port = read_ports(serve, deadline)
        ready_s = time.monotonic() - started
        result = asyncio.run(drive(grpc_port, metrics_port, serve, args))
        result["start_to_serving_s"] = round(ready_s, 2)
    finally:
        for process in (serve, replay):
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    result["completion_events"] = sum(e["kind"] == "completion" for e in lines)
    result["serve_log"] = str(workdir / "serve.log")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
