#!/usr/bin/env bash
# Verify the GPU container on a host with Docker and an NVIDIA GPU (this project's CI has neither).
#
#   make archive            # or make demo: model-store/shapes-1.0.mar must exist
#   scripts/verify_gpu_container.sh [IMAGE_TAG]
#
# Builds the image, runs it with --gpus all, waits for the HEALTHCHECK to report healthy,
# posts an image with curl (inference key from the container's key_file.json), checks the
# JSON, checks that the worker runs on CUDA, prints the versions inside the image, then removes
# the container. Expected output (timings vary):
#
#   image: serve-demo:verify  python 3.9.x  torch <the base image's, 2.x+cu12x>  cuda available True (NVIDIA ...)
#   waiting for healthy ... healthy after 40 s
#   prediction: 200, N detections, JSON ok
#   worker device: cuda:0 (model_log: "shapes 1.0 ready on cuda:0")
#   PASS
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-serve-demo:verify}"
NAME=serve-demo-verify
IMG=data/shapes/test/test_00000.jpg
fail() { echo "FAIL: $*"; docker logs --tail 50 "$NAME" 2>&1 || true; docker rm -f "$NAME" >/dev/null 2>&1 || true; exit 1; }

ls model-store/*.mar >/dev/null 2>&1 || fail "no archives in model-store/ (make archive)"
[ -f "$IMG" ] || IMG=docs/demo_detections.png
docker build -q -f docker/Dockerfile -t "$TAG" . >/dev/null || fail "docker build"
docker rm -f "$NAME" >/dev/null 2>&1 || true
docker run -d --name "$NAME" --gpus all -p 18080:8080 "$TAG" >/dev/null || fail "docker run --gpus all"

echo -n "image: $TAG  "
docker exec "$NAME" python -c "import sys, torch; print('python', sys.version.split()[0], ' torch', torch.__version__, \
 ' cuda available', torch.cuda.is_available(), '(' + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-') + ')')"

echo -n "waiting for healthy ..."
for i in $(seq 1 60); do
  state=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
  [ "$state" = healthy ] && break
  [ "$state" = unhealthy ] && fail "container unhealthy"
  sleep 5
done
[ "$state" = healthy ] || fail "not healthy after 300 s"
echo " healthy after $((i * 5)) s"

KEY=$(docker exec "$NAME" python -c "import json; print(json.load(open('/home/model-server/key_file.json'))['inference']['key'])")
MODEL=$(basename "$(ls model-store/*.mar | head -1)" .mar | cut -d- -f1)
code=$(curl -s -o /tmp/verify_gpu_container.json -w '%{http_code}' -X POST "http://127.0.0.1:18080/predictions/$MODEL" \
       -T "$IMG" -H "Authorization: Bearer $KEY")
[ "$code" = 200 ] || fail "prediction answered $code: $(cat /tmp/verify_gpu_container.json)"
python3 - <<'PY' || fail "response JSON"
import json
dets = json.load(open("/tmp/verify_gpu_container.json"))
assert isinstance(dets, list) and all("score" in d and len(d) == 2 for d in dets), dets
print(f"prediction: 200, {len(dets)} detections, JSON ok")
PY

line=$(docker exec "$NAME" sh -c 'grep -h "ready on" logs/model_log.log | tail -1' || true)
echo "worker device: $(echo "$line" | grep -o 'ready on [a-z:0-9]*' || echo '?') (model_log: \"${line##*- }\")"
echo "$line" | grep -q "ready on cuda" || fail "the worker is not on a CUDA device"
docker rm -f "$NAME" >/dev/null
echo PASS
