#!/usr/bin/env bash
# Regenerate the Python stubs of proto/routecache/v1 into routecache/v1 (checked in; the test
# suite fails when they are stale).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
    proto/routecache/v1/routecache.proto
