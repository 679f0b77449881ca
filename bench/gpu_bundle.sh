#!/usr/bin/env bash
# Prepare, on the development machine, what `make gpu-check` needs on a lent GPU machine that
# reaches no package registry and runs its own python3 (3.12, with torch and transformers):
#   .gpu/wheels/       cp312 wheels of the runtime packages that image lacks or holds too old
#                      (the same versions as this .venv); gpu_check.sh installs them into .gpu/site
#   .gpu/model-files/  the default model's config, tokenizer and chat template (3.6 MB); the
#                      94 MB GGUF of its weights does not fit the 64 MiB a device call carries, so
#                      bench/gpu_model.py gives that machine the same model with random weights
# Then, from the device tool: run(command="bash bench/gpu_check.sh", carry=[".gpu"]).
# Not carried: nixl-cu12 (a 68 MB wheel), so the nixl VRAM rows skip there, saying why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
OUT=.gpu
rm -rf "$OUT/wheels" "$OUT/model-files"
mkdir -p "$OUT/wheels" "$OUT/model-files"
PKGS="grpcio grpcio-health-checking grpcio-reflection protobuf msgspec opentelemetry-api
opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common
googleapis-common-protos httptools uvicorn h11 pytest-asyncio"
pins=()
for p in $PKGS; do
  v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] || { echo "gpu_bundle: $p is not installed in .venv (run make setup)" >&2; exit 1; }
  pins+=("$p==$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$OUT/wheels" "${pins[@]}"
model=$("$PY" -c 'from workers.model_files import resolve_model; print(resolve_model("default"))')
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$model/$f" ] && cp "$model/$f" "$OUT/model-files/"
done
du -sh "$OUT" | awk '{print "gpu_bundle: " $2 " is " $1 " (the device call carries at most 64 MiB)"}'
