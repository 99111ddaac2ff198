"""The checked-in stubs must be what grpcio-tools generates from the proto today."""

from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is a dev dependency")

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("routecache_pb2.py", "routecache_pb2.pyi", "routecache_pb2_grpc.py")


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    from grpc_tools import protoc

    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/routecache/v1/routecache.proto"),
        ]
    )
    assert code == 0
    for name in GENERATED:
        fresh = (tmp_path / "routecache/v1" / name).read_text()
        checked_in = (ROOT / "routecache/v1" / name).read_text()
        assert fresh == checked_in, f"routecache/v1/{name} is stale: run scripts/generate_stubs.sh"
