#!/usr/bin/env bash
# First run on a GPU machine, in order, printing everything (and keeping it in $GPU_CHECK_LOG):
#   1. driver and CUDA versions           4. pytest -m gpu -rs
#   2. the GPU packages installed          5. a TensorRT export of a tiny model
#   3. the GPU stack checks, and which     6. clip-serve on that engine, one request
#      providers load without and with     7. served images/s, ViT-B-32 fp16 at concurrency 64
#      the wheels' libraries preloaded
# Uses the GPU venv (make venv-gpu; PYTHON=... for another one). Without an NVIDIA driver, steps
# 1-3 still run and report it; the GPU steps are skipped, saying so, and the exit code is 2.
# Exit 0: every step ran and passed. 1: a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv-gpu/bin/python}"
WORK="${GPU_CHECK_DIR:-runs/gpu-check}"
LOG="${GPU_CHECK_LOG:-$WORK/gpu-check.log}"
PORT="${GPU_CHECK_PORT:-8711}"
BENCH_PROVIDERS="${BENCH_PROVIDERS:-cuda}"
mkdir -p "$WORK"
exec > >(tee "$LOG") 2>&1
tee_pid=$!
# Let tee write the last lines before the script returns.
finish() { exec 1>&- 2>&-; wait "$tee_pid"; exit "$1"; }

failed=0
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $*"; failed=1; }

step "0. environment"
echo "date: $(date -u +%FT%TZ)  host: $(uname -srm)  python: $PY  log: $LOG"
if [ ! -x "$PY" ]; then
  echo "no GPU venv at $PY: run 'make venv-gpu' (or set PYTHON to the interpreter of one)"
  finish 1
fi

step "1. NVIDIA driver and CUDA"
driver=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv
  nvidia-smi | grep -o 'CUDA Version: [0-9.]*' | head -1
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
  if [ "${driver%%.*}" -lt 580 ]; then
    fail "driver $driver is older than r580, which CUDA 13 (onnxruntime-gpu 1.31, TensorRT cu13) needs"
  fi
else
  echo "no NVIDIA driver: nvidia-smi is missing or finds no GPU; the GPU steps below are skipped"
fi

step "2. GPU packages in this environment"
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(onnxruntime|tensorrt|cuda-|nvidia-|torch )' || echo "(none found)"

step "3. GPU stack checks (one onnxruntime, providers in the build, ldd, TensorRT API, sessions)"
"$PY" -m clipserve.service.runtime.gpu_stack || fail "GPU stack checks"
echo "-- providers that load without preloading the wheels' libraries:"
"$PY" -m clipserve.service.runtime.gpu_stack --sessions no-preload
echo "-- and with them preloaded (what the service does):"
"$PY" -m clipserve.service.runtime.gpu_stack --sessions preload

if [ -z "$driver" ]; then
  step "4-7. skipped: no NVIDIA driver on this machine"
  finish 2
fi

step "4. pytest -m gpu -rs"
bash scripts/ensure-redis.sh || fail "no Redis for the tests"
"$PY" -m pytest -m gpu -rs -q || fail "gpu tests"

step "5. TensorRT export of a tiny model (random init, fp16 graphs and engines)"
rm -rf "$WORK/models"
"$PY" -m clipserve.export.cli --config training/configs/shapes-student.json --pretrained none --name tiny-trt \
  --models-dir "$WORK/models" --fp16 --tensorrt || fail "TensorRT export"
ls -l "$WORK"/models/tiny-trt/1/*.plan 2>/dev/null || fail "no engine written"

step "6. clip-serve on the TensorRT engines, one request"
CLIPSERVE_ENGINE=tensorrt CLIPSERVE_PROVIDERS=cuda CLIPSERVE_RELOAD_POLL_S=0 CLIPSERVE_DATA_DIR="$WORK/data" \
  "$PY" -m clipserve.service.server.cli --models "$WORK/models" --port "$PORT" --redis-url none &
server=$!
ready=""
for _ in $(seq 240); do
  if ! kill -0 "$server" 2>/dev/null; then break; fi
  if "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/readyz').status_code != 200)" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.5
done
if [ -n "$ready" ]; then
  "$PY" - "$PORT" <<'EOF' || fail "the request to the engine-served model"
import base64, io, sys
import httpx
from PIL import Image, ImageDraw

picture = Image.new("RGB", (64, 64), "white")
ImageDraw.Draw(picture).ellipse((8, 8, 56, 56), fill="red")
png = io.BytesIO()
picture.save(png, format="PNG")
body = {"texts": ["a red circle"], "images": [base64.b64encode(png.getvalue()).decode()]}
response = httpx.post(f"http://127.0.0.1:{sys.argv[1]}/v1/embed", json=body, timeout=60)
print(response.status_code, {k: v for k, v in response.json().items() if not k.endswith("embeddings")})
models = httpx.get(f"http://127.0.0.1:{sys.argv[1]}/v1/models").json()["data"]
print("served:", [(m["id"], m.get("precision"), m.get("providers")) for m in models])
sys.exit(response.status_code != 200)
EOF
else
  fail "clip-serve did not become ready on the engines"
fi
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null

step "7. served images/s: ViT-B-32 fp16 (random init), concurrency 64, providers $BENCH_PROVIDERS"
"$PY" bench/serve.py --models vitb32 --precision fp16 --providers "$BENCH_PROVIDERS" --concurrency 64 \
  --repo "$WORK/bench-models" --port "$((PORT + 1))" --json "$WORK/bench-vitb32-fp16.json" || fail "benchmark"

step "done: $([ "$failed" = 0 ] && echo 'every step passed' || echo 'some steps FAILED (see above)')"
finish "$failed"
