"""Session-wide setup shared by every test folder."""

from __future__ import annotations

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    # The service's default embedder runs an ONNX export of the packaged MiniLM, made once per
    # machine on first use (10-30 s on two busy cores). Doing it here, before any test starts a
    # server, keeps that one-off cost out of tests that time a server's start.
    from routecache.cache.onnx_embedder import ensure_onnx_export

    ensure_onnx_export()
