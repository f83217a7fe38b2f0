#!/usr/bin/env bash
# Generates Python code (messages, gRPC stubs, typed .pyi) for protos/ into the folder given, laid out as
# <out>/velesio/v1/*.py so that it imports as velesio.v1.*. Used by `make protos` and `make check-gen`.
set -euo pipefail
out=${1:?usage: gen-protos.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(dirname "$(command -v python)")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$root"
mkdir -p "$tmp/velesio/v1"
python -m grpc_tools.protoc -I protos -I third_party/googleapis \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$tmp" --grpc_python_out="$tmp" --mypy_out=quiet:"$tmp" --mypy_grpc_out=quiet:"$tmp" \
  --include_source_info --descriptor_set_out="$tmp/velesio/v1/descriptors.binpb" \
  protos/velesio/v1/*.proto
touch "$tmp/velesio/__init__.py" "$tmp/velesio/v1/__init__.py"
rm -rf "$out/velesio"
mkdir -p "$out"
cp -r "$tmp/velesio" "$out/velesio"
