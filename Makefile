# serve_demo: train -> archive -> serve -> evaluate a torchvision detector with TorchServe.
# `make` lists the targets. Every target sets up what it needs (venv, data, archive).

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

# NAME, DATA, VERSION, THRESHOLD, RUNTIME, PRECISION, GATE_TOLERANCE, SERVER, HOME_DIR, MODEL_STORE,
# PROMETHEUS_URL, PUBLISH and the ports are written once, in serve_demo/core/defaults.py (argparse and the
# library read them there); make includes them from it.
DEFAULTS_MK := build/defaults.mk
-include $(DEFAULTS_MK)
$(DEFAULTS_MK): serve_demo/core/defaults.py
	@mkdir -p $(@D) && $(PYTHON_SYS) serve_demo/core/defaults.py --make > $@

# the committed mask model is a maskrcnn_tiny; everything else defaults to the demo's fcos_tiny
ARCH       ?= $(if $(filter shapes_masks,$(NAME)),maskrcnn_tiny,fcos_tiny)
WEIGHTS    ?= weights/$(NAME).pt
LABELS     ?= index_to_name/$(NAME).json
MODEL_FILE ?=
WEIGHTS_PREFIX ?=
KEEP_DUPLICATE_LABELS ?=
FORMAT     ?=
MASK_THRESHOLD ?=
MODEL_KWARGS ?=
GPU_OPTIONS ?=
BATCH_SIZE ?= 1
# RUNTIME, the dense layers' runtime (docs/performance.md): auto = the fastest that passes the parity gate on
# this machine's PARITY_DATA/PARITY_SPLIT images (eager when none is faster; PARITY_IMAGES, default 8, more for a
# stricter gate); eager | onnxruntime | openvino. GRAPH=whole: the whole model in the runtime, not only its
# dense parts (refused when it does not answer a second image size like eager). PRECISION=auto: the fastest of
# that fp32 runtime, OpenVINO bf16 and int8 (dense parts or whole graph) whose COCO mAP on GATE_IMAGES labelled PARITY_SPLIT
# images is within GATE_TOLERANCE of fp32's; the archive's precision.json keeps every candidate's figures
PARITY_SPLIT ?= valid
GATE_IMAGES ?=
# workers x threads per worker: empty = the serving machine's layout (docs/performance.md)
WORKERS    ?=
THREADS    ?=
MASK_DATA  ?= data/shapes_masks
DATASET    ?= $(if $(filter shapes_masks,$(NAME)),$(MASK_DATA),$(DATA))
SPLIT      ?= test
EPOCHS     ?= 12
LIMIT      ?=
FORCE      ?=
A          ?=
B          ?=
IMAGE_TAG  ?= serve-demo:latest
BASE_IMAGE ?= debian:bookworm-slim
CONTAINER_NAME ?= serve-demo
GPUS       ?= auto
BENCH_MODELS ?= demo,trained,r50
# make bench DEVICE=cuda: the GPU variants through the mAP gate (serve_demo/bench/gpu.py)
DEVICE     ?= cpu
READ_ONLY  ?=
MEMORY     ?=
USERS      ?= 20
DURATION   ?= 2m
IMAGE      ?= $(DATA)/test/test_00000.jpg
DRAW       ?= reports/demo/detections.png
UI_PORT    ?= 8090
VIDEO      ?=
# make stream: SOURCES (files, rtsp://..., /dev/videoN; default: a generated clip of moving shapes with its truth),
# LINE / ZONE in pixels, STREAM_OUT, MAX_FPS, PACE (files: fast | realtime), DURATION_S; or SOURCES_FILE (watched)
SOURCES    ?=
SOURCES_FILE ?=
STREAM_OUT ?= reports/stream
STREAM_CLIP := build/stream/shapes.mp4
LINE       ?= $(if $(SOURCES)$(SOURCES_FILE),,door=160,0,160,240)
ZONE       ?=
MAX_FPS    ?=
PACE       ?=
DURATION_S ?=
VIDEO_OUT  ?= reports/video/$(NAME).mp4
EVERY      ?= 1
INFLIGHT   ?= 4
CAPTURE    ?=
WINDOW     ?= 1h
COLLECT_OUT ?= data/collected
PARITY_DATA ?= $(DATASET)
export INFERENCE_PORT MANAGEMENT_PORT METRICS_PORT GRPC_INFERENCE_PORT GRPC_MANAGEMENT_PORT

MAR        = $(MODEL_STORE)/$(NAME)-$(VERSION).mar
CONTAINER  := $(PYTHON_SYS) -m serve_demo.serve.container
SERVE_ARGS := --inference-port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) --metrics-port $(METRICS_PORT) \
	--grpc-ports $(GRPC_INFERENCE_PORT) $(GRPC_MANAGEMENT_PORT) --home $(HOME_DIR) --model-store $(MODEL_STORE)
ARCH_ARGS  := $(if $(MODEL_FILE),--model-file $(MODEL_FILE),--arch $(ARCH))
ARCHIVE_ARGS = --name $(NAME) --version $(VERSION) $(ARCH_ARGS) \
	--weights $(WEIGHTS) --labels $(LABELS) --threshold $(THRESHOLD) --batch-size $(BATCH_SIZE) \
	$(if $(FORMAT),--response-format $(FORMAT)) $(if $(MASK_THRESHOLD),--mask-threshold $(MASK_THRESHOLD)) \
	$(if $(MODEL_KWARGS),--model-kwargs '$(MODEL_KWARGS)') $(if $(WEIGHTS_PREFIX),--weights-prefix $(WEIGHTS_PREFIX)) \
	$(if $(KEEP_DUPLICATE_LABELS),--keep-duplicate-labels) $(if $(CAPTURE),--capture-rate $(CAPTURE)) \
	--runtime $(RUNTIME) --precision $(PRECISION) \
	$(if $(filter-out eager,$(RUNTIME)),--parity-data $(PARITY_DATA) --parity-split $(PARITY_SPLIT)) \
	$(if $(PARITY_IMAGES),--parity-images $(PARITY_IMAGES)) \
	$(if $(filter auto,$(PRECISION)),--gate-tolerance $(GATE_TOLERANCE) $(if $(GATE_IMAGES),--gate-images $(GATE_IMAGES))) \
	$(if $(GRAPH),--graph $(GRAPH)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(if $(THREADS),--threads $(THREADS)) \
	--export-path $(MODEL_STORE) $(GPU_OPTIONS)
URLS       := --url http://127.0.0.1:$(INFERENCE_PORT) --management-url http://127.0.0.1:$(MANAGEMENT_PORT)
MGMT_URL   := --management-url http://127.0.0.1:$(MANAGEMENT_PORT)
# VERSION only when given (make evaluate VERSION=2.0); otherwise the server's default version
GIVEN_VERSION := $(if $(filter command line environment,$(origin VERSION)),--version $(VERSION))
EVAL_ARGS  := --dataset $(DATASET) --split $(SPLIT) --threshold $(THRESHOLD) $(if $(LIMIT),--limit $(LIMIT)) $(URLS)
# the synthetic data is generated on demand; a user's DATASET must exist
NEEDS_DATA := $(if $(filter $(DATA),$(DATASET)),$(DATA)/.synth.json) \
	$(if $(filter $(MASK_DATA),$(DATASET)),$(MASK_DATA)/.synth.json)
# an accelerated archive's parity gate runs PARITY_DATA's images
PARITY_NEEDS := $(if $(filter-out eager,$(RUNTIME)),$(if $(filter $(DATA),$(PARITY_DATA)),$(DATA)/.synth.json) \
	$(if $(filter $(MASK_DATA),$(PARITY_DATA)),$(MASK_DATA)/.synth.json))

.PHONY: help setup check-env data data-masks pennfudan train train-demo train-masks train-frcnn archive serve stop predict evaluate demo test test-unit lint format clean \
	register versions promote rollback compare key loadtest soak docker-build docker-run docker-stop docker-key sbom \
	container-engine bench video ui browser prometheus-tools prometheus prometheus-stop drift dashboard collect \
	stream clip rtsp-server bench-streams

help: ## list the targets
	@echo "Usage: make TARGET [VAR=value ...]   (NAME=$(NAME) VERSION=$(VERSION) ARCH=$(ARCH))"
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON_SYS) scripts/check_java.py
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,int8,stream]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv with pinned torch/torchserve and check Java 11+
	@$(PY) -m serve_demo check-env

check-env: $(STAMP) ## check Java and the Python packages TorchServe needs
	$(PY) -m serve_demo check-env

$(DATA)/.synth.json: | $(STAMP)
	$(PY) -m serve_demo data --out $(DATA) --seed 0

data: $(DATA)/.synth.json ## generate the synthetic COCO dataset (train/valid/test, seed 0)

$(MASK_DATA)/.synth.json: | $(STAMP)
	$(PY) -m serve_demo data --out $(MASK_DATA) --seed 0 --masks

data-masks: $(MASK_DATA)/.synth.json ## the same scenes with instance masks (COCO RLE) -> data/shapes_masks

pennfudan: $(STAMP) ## convert PENNFUDAN=path/to/PennFudanPed (images + mask PNGs) -> data/pennfudan
	@test -n "$(PENNFUDAN)" || { echo "usage: make pennfudan PENNFUDAN=path/to/PennFudanPed"; exit 2; }
	$(PY) -m serve_demo convert-pennfudan $(PENNFUDAN) --out data/pennfudan

train: $(STAMP) ## train NAME on DATASET with ARCH (resumes from runs/NAME/checkpoint.pt)
	$(PY) -m serve_demo train --data $(DATASET) --name $(NAME) --arch $(ARCH) --epochs $(EPOCHS)

train-demo: data ## retrain the committed demo model (85 min on 2 CPU cores; see weights/shapes.json)
	$(PY) -m serve_demo train --data $(DATA) --name shapes --arch fcos_tiny --epochs 9 \
		--batch-size 8 --lr 2e-3 --seed 0 --eval-every 3 --fp16 --threads 2

train-masks: data-masks ## retrain the committed mask model from the demo's backbone (see weights/shapes_masks.json)
	$(PY) -m serve_demo train --data $(MASK_DATA) --name shapes_masks --arch maskrcnn_tiny --epochs 3 \
		--batch-size 8 --lr 2e-3 --seed 0 --eval-every 1 --threads 2 --init-backbone weights/shapes.pt --fp16

# the trained two-stage model at its real input size (docs/performance.md): torchvision's MobileNetV3-FPN
# Faster R-CNN, weights=None, trained from scratch; fewer proposals sampled in training only (inference is stock)
FRCNN_TRAIN_KWARGS := {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "box_batch_size_per_image": 128}
train-frcnn: data ## train weights/shapes_frcnn.pt, the trained two-stage bench model (resumable; see weights/shapes_frcnn.json)
	$(PY) -m serve_demo train --data $(DATA) --name shapes_frcnn --arch fasterrcnn_mobilenet_v3_large_320_fpn \
		--epochs 3 --batch-size 4 --lr 2e-3 --seed 0 --eval-every 1 --threads 2 --fp16 \
		--model-kwargs '$(FRCNN_TRAIN_KWARGS)'

# The archive depends on the values that build it too: ARCHIVE_ARGS is kept in a stamp, rewritten when
# it changes (make demo THRESHOLD=0.3 after make demo rebuilds a 0.3 archive).
ARCHIVE_STAMP = build/archive-args/$(NAME)-$(VERSION).args
ifneq ($(NAME),)  # empty only before build/defaults.mk exists (make then restarts with it)
ifneq ($(file <$(ARCHIVE_STAMP)),$(strip $(ARCHIVE_ARGS)))
$(shell mkdir -p build/archive-args)
$(file >$(ARCHIVE_STAMP),$(strip $(ARCHIVE_ARGS)))
endif
endif

$(MAR): $(ARCHIVE_STAMP) $(WEIGHTS) $(LABELS) $(wildcard serve_demo/core/*.py serve_demo/archive/*.py handlers/*.py) \
		| $(STAMP) $(PARITY_NEEDS)
	$(PY) -m serve_demo archive $(ARCHIVE_ARGS)

archive: $(PARITY_NEEDS) | $(STAMP) ## bundle WEIGHTS + LABELS (+ MODEL_FILE) into model-store/NAME-VERSION.mar; RUNTIME=auto|eager|onnxruntime|openvino, PRECISION, WORKERS, THREADS
	$(PY) -m serve_demo archive $(ARCHIVE_ARGS)

serve: $(STAMP) ## start TorchServe (SERVER=kserve: KServe's ModelServer) on the recorded versions; loopback unless PUBLISH=0.0.0.0
	$(PY) -m serve_demo serve --server $(SERVER) --bind $(PUBLISH) $(SERVE_ARGS)

loadtest: $(NEEDS_DATA) | $(STAMP) ## locust, headless: USERS for DURATION against the running server -> reports/loadtest
	$(PY) scripts/soak.py --users $(USERS) --duration $(DURATION) --model $(NAME) --bad-share 0 \
		--out reports/loadtest --images $(DATASET)/$(SPLIT)

soak: $(NEEDS_DATA) | $(STAMP) ## 50 users x 5 min, 10% malformed, worker RSS watched -> reports/soak
	$(PY) scripts/soak.py --users 50 --duration 5m --model $(NAME) --bad-share 0.1 --max-rss-growth 0.05 \
		--out reports/soak --images $(DATASET)/$(SPLIT)

# The serving image (docker/Dockerfile): docker where its daemon answers, else podman (installed when
# root). No venv is needed to build it; the base is built locally where no registry answers.
docker-build: ## build the serving image IMAGE_TAG (CPU and GPU) on BASE_IMAGE; docker, else podman
	$(CONTAINER) build --tag $(IMAGE_TAG) --base $(BASE_IMAGE)

docker-run: $(NEEDS_DATA) ## run IMAGE_TAG on MODEL_STORE, ports on PUBLISH (127.0.0.1), keys+logs in HOME_DIR; wait healthy
	@$(MAKE) --no-print-directory $(MAR)
	$(CONTAINER) run --tag $(IMAGE_TAG) --name $(CONTAINER_NAME) --store $(MODEL_STORE) --home $(HOME_DIR) \
		--address $(PUBLISH) --ports $(INFERENCE_PORT) $(MANAGEMENT_PORT) $(METRICS_PORT) --gpus $(GPUS) \
		$(if $(READ_ONLY),--read-only) $(if $(MEMORY),--memory $(MEMORY))

docker-stop: ## stop the container (SIGTERM: requests in flight are answered) and remove it
	@$(CONTAINER) stop --name $(CONTAINER_NAME)

docker-key: ## the inference key of a container started by hand (docker run ...): CONTAINER_NAME
	@$(CONTAINER) key --name $(CONTAINER_NAME)

sbom: $(STAMP) ## CycloneDX SBOM of IMAGE_TAG's Python packages -> reports/sbom/serve-demo.cdx.json
	$(PY) -m serve_demo.serve.container sbom --tag $(IMAGE_TAG)

container-engine: ## check for docker/podman; install podman (root + apt-get) when there is none
	@$(CONTAINER) engine

# the trained bench model is not committed (39 MB): built once, about 50 min on 2 cores, then kept
FRCNN_WEIGHTS := weights/shapes_frcnn.pt
$(FRCNN_WEIGHTS):
	@echo "$@ is missing: training it (make train-frcnn, resumable; about 50 min on 2 CPU cores)"
	$(MAKE) train-frcnn

bench: $(DATA)/.synth.json $(if $(findstring trained,$(BENCH_MODELS)),$(FRCNN_WEIGHTS)) | $(STAMP) ## on a quiet machine: in-process eager + runtimes vs ours (TorchServe, KServe), stock, LitServe (BENCH_MODELS) -> reports/bench
	$(PY) -m serve_demo bench --models $(BENCH_MODELS) --dataset $(DATA) --split $(SPLIT) \
		$(if $(filter cuda,$(DEVICE)),--device cuda,--kserve)

bench-streams: $(RTSP) | $(STAMP) ## on a quiet machine, with make serve running: 1, 2, 4 RTSP cameras -> reports/bench/streams.md
	$(PY) -m serve_demo bench-streams --model $(NAME) --url http://127.0.0.1:$(INFERENCE_PORT) --home $(HOME_DIR) \
		--inflight $(INFLIGHT)

key: ## print the running server's inference key (curl ... -H "Authorization: Bearer $$(make -s key)")
	@$(PY) -c "from serve_demo.serve.management import read_key; import sys; k = read_key('$(HOME_DIR)', 'inference'); \
		print(k) if k else sys.exit('no key: is TorchServe running (make serve) with token authorization on? ' \
		'(the KServe server has none: see docs/security.md)')"

stop: ## stop TorchServe and wait for the JVM to exit
	@if [ -x $(PY) ]; then $(PY) -m serve_demo stop $(SERVE_ARGS); fi

ui: $(STAMP) ## a browser page for the running server on http://127.0.0.1:8090 (UI_PORT): drop an image, slide the threshold
	$(PY) -m serve_demo ui --port $(UI_PORT) --url http://127.0.0.1:$(INFERENCE_PORT) \
		--management-url http://127.0.0.1:$(MANAGEMENT_PORT) --home $(HOME_DIR)

# Monitoring: Debian's Prometheus and promtool (the tests start a real one); installed when root
PROMETHEUS_BIN := /usr/bin/prometheus /usr/bin/promtool
$(PROMETHEUS_BIN):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	else echo "the monitoring tests need Prometheus and promtool: sudo apt-get install prometheus"; exit 2; fi

prometheus-tools: $(PROMETHEUS_BIN) ## install Prometheus + promtool (Debian) for make prometheus and the tests

prometheus: $(PROMETHEUS_BIN) $(STAMP) ## a Prometheus on 127.0.0.1:9090 scraping the server's :8082 and make stream's :8095 (alerts loaded)
	$(PY) -m serve_demo prometheus --target 127.0.0.1:$(METRICS_PORT)

prometheus-stop: ## stop make prometheus's Prometheus
	@$(PY) -m serve_demo prometheus --stop

drift: $(STAMP) ## PSI of the last WINDOW of live traffic vs NAME VERSION's evaluation baseline; exit 1 on drift
	$(PY) -m serve_demo drift --model $(NAME) --version $(VERSION) --window $(WINDOW) --prometheus $(PROMETHEUS_URL)

dashboard: $(STAMP) ## draw the Grafana dashboard's panels from Prometheus -> reports/dashboard/dashboard.png
	$(PY) -m serve_demo dashboard --prometheus $(PROMETHEUS_URL)

collect: $(STAMP) ## captured uncertain images (archive CAPTURE=share) -> COLLECT_OUT, a COCO dataset to label
	$(PY) -m serve_demo collect --capture $(HOME_DIR)/capture --out $(COLLECT_OUT)

# the browser test drives Debian's Chromium; installed here when missing and we are root
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
$(BROWSER):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "the browser test needs Chromium and its driver: sudo apt-get install chromium chromium-driver"; exit 2; fi

browser: $(BROWSER) ## install Chromium + chromedriver (Debian) for the browser test, if missing

video: $(STAMP) ## VIDEO=file-or-stream-URL through the server -> VIDEO_OUT (.mp4) + .jsonl (EVERY, INFLIGHT)
	@test -n "$(VIDEO)" || { echo "usage: make video VIDEO=clip.mp4 [VIDEO_OUT=reports/video/out.mp4 EVERY=1 INFLIGHT=4]"; exit 2; }
	$(PY) -m serve_demo video $(VIDEO) --out $(VIDEO_OUT) --model $(NAME) --every $(EVERY) --inflight $(INFLIGHT) \
		--url http://127.0.0.1:$(INFERENCE_PORT) --home $(HOME_DIR)

$(STREAM_CLIP): | $(STAMP)
	$(PY) -m serve_demo clip $@

clip: $(STREAM_CLIP) ## the moving-shapes clip with its truth (tracks, line crossings) -> build/stream/shapes.mp4

stream: $(if $(SOURCES)$(SOURCES_FILE),,$(STREAM_CLIP)) | $(STAMP) ## SOURCES="cam.mp4 rtsp://..." through the server: tracks, counts -> STREAM_OUT, live page :8095
	$(PY) -m serve_demo stream $(or $(SOURCES),$(if $(SOURCES_FILE),,$(STREAM_CLIP))) --out $(STREAM_OUT) --model $(NAME) \
		--inflight $(INFLIGHT) --url http://127.0.0.1:$(INFERENCE_PORT) --home $(HOME_DIR) \
		$(if $(SOURCES_FILE),--sources-file $(SOURCES_FILE)) $(foreach l,$(LINE),--line $(l)) $(foreach z,$(ZONE),--zone $(z)) \
		$(if $(MAX_FPS),--max-fps $(MAX_FPS)) $(if $(PACE),--pace $(PACE)) $(if $(DURATION_S),--duration $(DURATION_S))
	@if [ -z "$(SOURCES)$(SOURCES_FILE)" ]; then $(PY) -m serve_demo track-score $(STREAM_OUT)/shapes.jsonl \
		$(STREAM_CLIP).truth.json | head -1; fi

# a local RTSP server (GStreamer's, Debian packages) for trying make stream on a "camera", and for the tests
RTSP := /usr/lib/python3/dist-packages/gi/__init__.py /usr/lib/x86_64-linux-gnu/girepository-1.0/GstRtspServer-1.0.typelib \
	/usr/lib/x86_64-linux-gnu/gstreamer-1.0/libgstrtp.so
$(RTSP):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-base python3-gi >/dev/null; \
	else echo "the RTSP tests need GStreamer's RTSP server: sudo apt-get install gir1.2-gst-rtsp-server-1.0" \
		"gstreamer1.0-plugins-good python3-gi"; exit 2; fi

rtsp-server: $(RTSP) build/stream/shapes.mkv ## serve the moving-shapes clip as a camera: rtsp://127.0.0.1:8554/shapes (Ctrl-C stops)
	/usr/bin/python3 scripts/rtsp_server.py --port 8554 --mount shapes=build/stream/shapes.mkv

build/stream/shapes.mkv: | $(STAMP)
	$(PY) -m serve_demo clip $@

predict: $(STAMP) ## post IMAGE to NAME and draw the boxes into DRAW
	$(PY) -m serve_demo predict $(IMAGE) --model $(NAME) --draw $(DRAW) \
		--url http://127.0.0.1:$(INFERENCE_PORT)

evaluate: $(NEEDS_DATA) | $(STAMP) ## COCO mAP + F2 of the served NAME [VERSION] on DATASET/SPLIT -> reports/
	$(PY) -m serve_demo evaluate --model $(NAME) $(GIVEN_VERSION) $(EVAL_ARGS)

versions: $(STAMP) ## list NAME's versions: default, served or not, workers, archive
	$(PY) -m serve_demo versions --model $(NAME) $(MGMT_URL)

register: $(STAMP) ## load model-store/NAME-VERSION.mar into the running server beside the others
	$(PY) -m serve_demo register --model $(NAME) --version $(VERSION) $(MGMT_URL)

promote: $(NEEDS_DATA) | $(STAMP) ## make VERSION NAME's default if its mAP passes the gate (GATE_TOLERANCE, FORCE=1)
	$(PY) -m serve_demo promote --model $(NAME) --version $(VERSION) --tolerance $(GATE_TOLERANCE) \
		$(if $(FORCE),--force) $(EVAL_ARGS)

rollback: $(STAMP) ## return NAME's default to the previous default
	$(PY) -m serve_demo rollback --model $(NAME) $(MGMT_URL)

compare: $(NEEDS_DATA) | $(STAMP) ## side-by-side metrics + plot of NAME versions A and B
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make compare NAME=$(NAME) A=1.0 B=2.0"; exit 2; }
	$(PY) -m serve_demo compare --model $(NAME) --a $(A) --b $(B) $(EVAL_ARGS)

demo: data $(NEEDS_DATA) ## end to end: setup, data, archive the committed model, serve, predict, draw
	@$(MAKE) --no-print-directory $(MAR)
	@$(MAKE) --no-print-directory serve
	$(PY) -m serve_demo predict $(IMAGE) --model $(NAME) --draw $(DRAW) \
		--url http://127.0.0.1:$(INFERENCE_PORT)
	@echo "annotated picture: $(DRAW); TorchServe keeps running (make stop); look at it in a browser: make ui"

test: $(STAMP) $(BROWSER) $(PROMETHEUS_BIN) $(RTSP) ## lint, then the test suite: unit, integration, real TorchServe + KServe, Prometheus, Chromium, the image
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory docker-build
	$(PY) -m pytest tests -q

test-unit: lint ## ruff, the layer contracts, then the pure tests (no archive, server or training; under a minute)
	$(PY) -m pytest tests -q -m unit

lint: $(STAMP) ## ruff check and the import layers (lint-imports: pyproject.toml); changes nothing
	$(PY) -m ruff check serve_demo handlers tests scripts docker/healthcheck.py
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP) ## ruff format + fix imports
	$(PY) -m ruff check --fix serve_demo handlers tests scripts
	$(PY) -m ruff format serve_demo handlers tests scripts

clean: stop ## remove built archives, build/ and reports/ (keeps .venv, data, weights)
	rm -rf build reports $(MODEL_STORE)/*.mar $(MODEL_STORE)/registry.json
