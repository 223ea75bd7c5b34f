#!/usr/bin/env bash
# Regenerate src/kernelport/schema/protos/descriptors.binpb from the
# .proto files next to it.
#
# kernelport ships a serialized FileDescriptorSet instead of generated *_pb2.py
# modules: kernelport/schema/pb.py loads it into a private descriptor pool so that it can coexist
# with tritonclient's registration of the same "inference.*" symbols.
#
# protoc comes from grpcio-tools. It is not installed in the project venv
# because its protobuf pin conflicts with the runtime's; if the current python
# (or $PYTHON) cannot import grpc_tools, a throwaway venv is created.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
proto_dir="$repo_root/src/kernelport/schema/protos"
out="$proto_dir/descriptors.binpb"
python="${PYTHON:-python3}"

tmp=""
cleanup() { if [[ -n "$tmp" ]]; then rm -rf "$tmp"; fi; }
trap cleanup EXIT

if ! "$python" -c 'import grpc_tools.protoc' >/dev/null 2>&1; then
  tmp="$(mktemp -d)"
  echo "gen_protos: installing grpcio-tools into a temporary venv ($tmp)" >&2
  "$python" -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check grpcio-tools
  python="$tmp/venv/bin/python"
fi

# Paths are given relative to proto_dir so the file names recorded in the
# descriptors are exactly "grpc_service.proto" / "model_config.proto", the
# names Triton's clients use.
cd "$proto_dir"
"$python" -m grpc_tools.protoc \
  --proto_path=. \
  --include_imports \
  --descriptor_set_out="$out.tmp" \
  grpc_service.proto model_config.proto kernelport_v1.proto
mv "$out.tmp" "$out"
echo "gen_protos: wrote $out ($(wc -c <"$out") bytes)" >&2
