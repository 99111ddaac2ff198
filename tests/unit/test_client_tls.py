"""ClientTls.from_files takes the paths as README shows them: plain strings or Paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from routecache.client import ClientTls


def test_from_files_accepts_string_paths(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem"))
    for path in (ca, cert, key):
        path.write_bytes(f"PEM of {path.name}".encode())

    tls = ClientTls.from_files(str(ca), str(cert), str(key))

    assert tls == ClientTls(b"PEM of ca.pem", b"PEM of cert.pem", b"PEM of key.pem")
    assert ClientTls.from_files(ca) == ClientTls(b"PEM of ca.pem")


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(b"x")
    with pytest.raises(ValueError, match="needs its key"):
        ClientTls.from_files(None, str(cert))
