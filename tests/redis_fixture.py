"""A real redis-server on a free loopback port with its own data directory, for tests and
benchmarks. Append-only with fsync on every write, so a killed server keeps every write it
acknowledged."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()),
        None,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    def __init__(
        self, executable: str, data_dir: Path, appendonly: bool = True, appendfsync: str = "always"
    ) -> None:
        self.executable = executable
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.executable, "--bind", "127.0.0.1", "--port", str(self.port),
            "--dir", str(self.data_dir), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
            "--protected-mode", "yes", "--loglevel", "warning", "--enable-debug-command", "local",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.data_dir
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise RuntimeError(f"redis-server exited: {err}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server not ready on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def flushall(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            client.flushall()
        finally:
            client.close()

    @contextlib.contextmanager
    def out_of_memory(self) -> Iterator[None]:
        """Redis refuses every write (OOM under `noeviction`) but answers reads and pings."""
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            client.config_set("maxmemory-policy", "noeviction")  # the default: said, not assumed
            client.config_set("maxmemory", 1)
            try:
                yield
            finally:
                client.config_set("maxmemory", 0)
        finally:
            client.close()

    @contextlib.contextmanager
    def denied(self, *commands: str) -> Iterator[None]:
        """Redis refuses these commands (NOPERM) but answers every other one, pings too."""
        client = redis.Redis(host="127.0.0.1", port=self.port)
        # Rules added to the default user's, whose other rules stay (acl_setuser would turn it off).
        rules = [f"-{c}" for c in commands]
        try:
            client.execute_command("ACL", "SETUSER", "default", *rules)  # type: ignore[no-untyped-call]
            try:
                yield
            finally:
                allowed = [f"+{c}" for c in commands]
                client.execute_command("ACL", "SETUSER", "default", *allowed)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def wait_stalled(self, within: float = 10.0) -> None:
        """Returns once the server answers nobody, i.e. a debug_sleep() begun on another thread
        has reached it: a fixed pause instead let a test on a loaded host go on before the stall.
        A PING that times out is the sign (it is answered, unread, once the stall ends)."""
        deadline = time.monotonic() + within
        # No retries: redis-py retries a timed-out call by default, past the stall's end.
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.1,
                             retry=Retry(NoBackoff(), 0))  # fmt: skip
        try:
            while True:
                try:
                    client.ping()
                except redis.exceptions.TimeoutError:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {self.port} never stalled")
                time.sleep(0.005)
        finally:
            client.close()

    def debug_sleep(self, seconds: float) -> None:
        """Keep the server busy (it answers nobody) for `seconds`; blocks the caller as long."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=seconds + 5)
        try:
            # redis-py has no typed wrapper for DEBUG SLEEP.
            client.execute_command("DEBUG", "SLEEP", str(seconds))  # type: ignore[no-untyped-call]
        finally:
            client.close()


@contextlib.contextmanager
def temporary_redis_server(appendonly: bool = True, appendfsync: str = "always") -> Iterator[str]:
    """A redis-server in a scratch directory for the length of a benchmark; yields its URL."""
    executable = find_redis_server()
    if executable is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as data_dir:
        server = RedisServer(executable, Path(data_dir), appendonly, appendfsync)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
