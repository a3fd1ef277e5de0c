#!/usr/bin/env bash
# Verify the serving image on a GPU host (this project's CI has no GPU): Docker (or podman) with the
# NVIDIA driver and container toolkit, and `make demo` run once (model-store/shapes-1.0.mar).
#
#   scripts/verify_gpu_container.sh [IMAGE_TAG]      # default serve-demo:latest, built if missing
#
# Runs the image with the GPU (`--gpus all`; podman: `--device nvidia.com/gpu=all`), waits for the
# HEALTHCHECK, checks that torch inside sees CUDA, that the TorchServe worker loaded the model on
# cuda:0, posts an image with curl and checks the labelled boxes, then runs scripts/verify_gpu.py
# inside the container: fp32 CUDA vs CPU parity (boxes within 0.1 px), fp16 vs CPU (>= 95 % of
# the detections above 0.5), nvjpeg decode, and latencies. Expected output (figures vary by GPU):
#
#   engine: docker   image: serve-demo:latest
#   in the image: python 3.11.2  torch 2.14.1+cu130  cuda available True (NVIDIA H100 80GB HBM3)
#   healthy after 9 s
#   worker device: ready on cuda:0
#   prediction: 200, 7 labelled boxes
#   cuda: NVIDIA H100 80GB HBM3 (torch 2.14.1)
#   fp32 cuda vs cpu: 20 images, max box diff 0.00xx px, max score diff 0.000x, labels equal: True
#   fp16 cuda vs cpu: 20 images, matched 9x.x % of NN detections above 0.5
#   latency per image: cpu xx ms, cuda fp32 x ms, cuda fp16 x ms
#   ...
#   PASS
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-serve-demo:latest}"
NAME=serve-demo-verify-gpu
PORT=18080
STORE="$(pwd)/model-store"
IMG=data/shapes/test/test_00000.jpg
CONTAINER="python3 -m serve_demo.serve.container"
ENGINE=$($CONTAINER engine | cut -d' ' -f1)
if [ "$ENGINE" = podman ]; then GPU=(--device nvidia.com/gpu=all); else GPU=(--gpus all); fi
fail() { echo "FAIL: $*"; $ENGINE logs --tail 50 "$NAME" 2>&1 || true; $ENGINE rm -f "$NAME" >/dev/null 2>&1 || true; exit 1; }

ls "$STORE"/shapes-1.0.mar >/dev/null 2>&1 || fail "no model-store/shapes-1.0.mar (make demo)"
[ -f "$IMG" ] || fail "no $IMG (make data)"
command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this host has no NVIDIA driver"
$ENGINE image inspect "$TAG" >/dev/null 2>&1 || $CONTAINER build --tag "$TAG"
echo "engine: $ENGINE   image: $TAG"
echo -n "in the image: "
$ENGINE run --rm "${GPU[@]}" --entrypoint python "$TAG" -c "import sys, torch; print('python', sys.version.split()[0], \
' torch', torch.__version__, ' cuda available', torch.cuda.is_available(), \
'(' + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-') + ')')" | tee /tmp/verify_gpu_image.txt
grep -q "cuda available True" /tmp/verify_gpu_image.txt || fail "torch in the image does not see the GPU (driver, toolkit?)"

$ENGINE rm -f "$NAME" >/dev/null 2>&1 || true
$ENGINE run -d --name "$NAME" "${GPU[@]}" -p "127.0.0.1:$PORT:8080" -v "$STORE:/home/model-server/model-store:ro" \
  -v "$(pwd)/scripts:/verify:ro" -v "$(pwd)/data:/data:ro" "$TAG" >/dev/null || fail "run with the GPU"
for i in $(seq 1 120); do
  $ENGINE healthcheck run "$NAME" >/dev/null 2>&1 || true  # podman without systemd timers
  state=$($ENGINE inspect -f '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo absent)
  [ "$state" = healthy ] && break
  [ "$state" = absent ] && fail "the container exited"
  sleep 1
done
[ "$state" = healthy ] || fail "not healthy after 120 s"
echo "healthy after $i s"

line=$($ENGINE exec "$NAME" sh -c 'grep -h "ready on" /home/model-server/run/logs/model_log.log | tail -1' || true)
echo "worker device: $(echo "$line" | grep -o 'ready on [a-z:0-9]*' || echo '?')"
echo "$line" | grep -q "ready on cuda" || fail "the TorchServe worker is not on a CUDA device"

KEY=$($ENGINE exec "$NAME" python -c "import json; print(json.load(open('/home/model-server/run/key_file.json'))['inference']['key'])")
code=$(curl -s -o /tmp/verify_gpu_container.json -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/predictions/shapes" \
       -T "$IMG" -H "Authorization: Bearer $KEY")
[ "$code" = 200 ] || fail "prediction answered $code: $(cat /tmp/verify_gpu_container.json)"
python3 - <<'PY' || fail "response JSON"
import json
dets = json.load(open("/tmp/verify_gpu_container.json"))
assert isinstance(dets, list) and dets and all("score" in d and len(d) == 2 for d in dets), dets
print(f"prediction: 200, {len(dets)} labelled boxes")
PY

$ENGINE exec "$NAME" python /verify/verify_gpu.py --mar /home/model-server/model-store/shapes-1.0.mar \
  | tee /tmp/verify_gpu_inside.txt || fail "GPU parity inside the container"
tail -1 /tmp/verify_gpu_inside.txt | grep -q PASS || fail "GPU parity inside the container"
$ENGINE stop -t 15 "$NAME" >/dev/null && $ENGINE rm -f "$NAME" >/dev/null
echo PASS
