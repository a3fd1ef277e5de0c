"""Accelerated runtimes (ONNX Runtime, OpenVINO), the parity gate, the CPU layout and the quiet
frontend: pure units, exports of every family, archives refused or accepted by the gate, and a real
TorchServe serving eager and accelerated archives of the committed models side by side."""

from __future__ import annotations

import json
import threading
import time
import zipfile

import pytest
import requests
import torch
import yaml
from torch import nn

from serve_demo.archive import parity, precision
from serve_demo.archive.builder import ArchiveError, build
from serve_demo.archive.export import export_parts
from serve_demo.core import masks
from serve_demo.core.defaults import GATE_TOLERANCE
from serve_demo.core.layout import WORKERS_ENV, available_cpus, cpu_layout, runtime_threads, worker_layout
from serve_demo.core.models import available_archs, build_model
from serve_demo.core.runtime import (
    Occupancy,
    RuntimeConfig,
    RuntimeManifest,
    ThreadChoice,
    accelerate,
    flatten,
    openvino_float_precision,
    thread_choice,
    unflatten,
)
from serve_demo.data.synth import SynthConfig, generate_split
from serve_demo.evaluate.evaluator import evaluate
from serve_demo.serve.management import Management

from .conftest import DEMO_LABELS, DEMO_WEIGHTS, ROOT, archive_args, encode, make_server, post, synth_image

MASK_WEIGHTS = ROOT / "weights" / "shapes_masks.pt"
MASK_LABELS = ROOT / "index_to_name" / "shapes_masks.json"


# --- units ---------------------------------------------------------------------------------------

@pytest.mark.unit
def test_flatten_roundtrip_keeps_nesting_and_order():
    a, b, c, d = (torch.full((i + 1,), float(i)) for i in range(4))
    nest = ({"0": a, "pool": b}, [c, (d,)])
    flat, spec = flatten(nest)
    assert [t.tolist() for t in flat] == [x.tolist() for x in (a, b, c, d)]
    back = unflatten(iter(flat), json.loads(json.dumps(spec)))  # the spec survives runtime.json
    assert list(back[0]) == ["0", "pool"] and back[0]["pool"] is b and back[1][1][0] is d
    assert isinstance(back, tuple) and isinstance(back[1], list) and isinstance(back[1][1], tuple)
    with pytest.raises(TypeError, match="cannot export a part taking or returning int"):
        flatten((a, 3))


@pytest.mark.unit
def test_runtime_config_names_bad_values():
    assert RuntimeConfig.from_yaml(None) == RuntimeConfig("eager", "fp32")
    assert RuntimeConfig.from_yaml("openvino").accelerated
    assert RuntimeConfig.from_yaml({"name": "openvino", "precision": "int8"}).label == "openvino-int8"
    whole_int8 = RuntimeConfig.from_yaml({"name": "openvino", "precision": "int8", "graph": "whole"})
    assert whole_int8.label == "openvino-whole-int8" and openvino_float_precision(whole_int8) == "bf16"
    assert openvino_float_precision(RuntimeConfig("openvino", "int8")) == "f32"  # NNCF's parts keep f32 between
    assert openvino_float_precision(RuntimeConfig("openvino", "bf16", graph="whole")) == "bf16"
    with pytest.raises(ValueError, match="must be one of .*'tensorflow'"):
        RuntimeConfig.from_yaml({"name": "tensorflow"})
    with pytest.raises(ValueError, match="precision int8 needs the openvino runtime"):
        RuntimeConfig.from_yaml({"name": "onnxruntime", "precision": "int8"})
    with pytest.raises(ValueError, match="handler.runtime must be"):
        RuntimeConfig.from_yaml({"name": "openvino", "threads": 2})


@pytest.mark.unit
@pytest.mark.parametrize("cpus,workers,expected", [
    (1, 0, (1, 1)), (2, 0, (2, 1)), (8, 0, (8, 1)), (16, 0, (16, 1)), (32, 0, (16, 2)), (96, 0, (16, 6)),
    (2, 1, (1, 2)), (8, 2, (2, 4)), (2, 3, (3, 1)),
])
def test_cpu_layout(cpus, workers, expected):
    layout = cpu_layout(cpus, workers)
    assert (layout.workers, layout.threads) == expected
    assert layout.workers * layout.threads <= max(cpus, workers)


@pytest.mark.unit
def test_available_cpus_follows_the_cgroup_quota(tmp_path):
    import os

    mine = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: a container's --cpus 1.5
    assert available_cpus(tmp_path) == min(mine, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == mine
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(v1) == mine


@pytest.mark.unit
@pytest.mark.parametrize("threads,workers,cpus,expected", [
    (1, 1, 1, 1), (2, 1, 2, 2), (1, 2, 2, 2), (1, 16, 16, 2), (2, 16, 32, 4), (1, 3, 2, 2),
])
def test_runtime_threads_borrow_an_idle_neighbour_core(threads, workers, cpus, expected):
    assert runtime_threads(threads, workers, cpus) == expected


@pytest.mark.unit
def test_occupancy_lets_a_lone_worker_go_wide(tmp_path):
    import os
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    dead = child.pid  # reaped: no such process now
    (tmp_path / str(dead)).touch()  # a worker that died inside a forward pass
    occ = Occupancy(tmp_path)
    assert not (tmp_path / str(dead)).exists()
    choice = ThreadChoice(1, 2)
    with occ.inside(choice):
        assert choice.use_wide and (tmp_path / str(os.getpid())).exists()
    assert not choice.use_wide and not list(tmp_path.iterdir())
    (tmp_path / str(os.getppid())).touch()  # another live worker is busy
    with occ.inside(choice):
        assert not choice.use_wide
    assert [p.name for p in tmp_path.iterdir()] == [str(os.getppid())]


@pytest.mark.unit
def test_worker_threads_share_the_cpus(monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert worker_layout(min_workers=1, threads=3).threads == 3  # the archive decides
    cpus = available_cpus()
    assert worker_layout(min_workers=1).threads == cpus
    monkeypatch.setenv(WORKERS_ENV, "1")  # the server starts one worker per model
    assert worker_layout().threads == cpus
    monkeypatch.setenv(WORKERS_ENV, str(cpus))
    assert worker_layout().threads == 1


def _answer(boxes, scores, labels, **extra) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels), **extra}


def _report(a: dict, b: dict) -> parity.ParityReport:
    report = parity.ParityReport()
    parity.compare(a, b, report, "img")
    report.images = 1
    return report


@pytest.mark.unit
def test_parity_compare_passes_within_tolerance_and_names_the_failures():
    eager = _answer([[10, 10, 50, 50], [60, 60, 90, 99]], [0.9, 0.4], [1, 2])
    close = _answer([[10.2, 10, 50, 49.9], [60, 60, 90, 99]], [0.9004, 0.4], [1, 2])
    ok = _report(eager, close)
    assert ok.passed and ok.detections == 2 and ok.max_box_diff == pytest.approx(0.2, abs=1e-5)

    moved = _report(eager, _answer([[10.8, 10, 50, 50], [60, 60, 90, 99]], [0.9, 0.4], [1, 2]))
    assert not moved.passed and moved.max_box_diff == pytest.approx(0.8, abs=1e-5)
    assert "max box difference 0.8 px (limit 0.5)" in moved.summary() and "worst: img" in moved.summary()

    rescored = _report(eager, _answer([[10, 10, 50, 50], [60, 60, 90, 99]], [0.9, 0.402], [1, 2]))
    assert not rescored.passed and rescored.max_score_diff == pytest.approx(0.002, abs=1e-6)

    relabelled = _report(eager, _answer([[10, 10, 50, 50], [60, 60, 90, 99]], [0.9, 0.4], [1, 3]))
    assert not relabelled.passed and relabelled.label_mismatches == 2  # counted from both sides

    missing = _report(eager, _answer([[10, 10, 50, 50]], [0.9], [1]))
    assert not missing.passed and missing.unmatched == 1 and "score 0.4000" in missing.summary()


@pytest.mark.unit
def test_parity_tolerates_only_the_cut_at_the_score_floor():
    eager = _answer([[10, 10, 50, 50], [60, 60, 90, 99]], [0.9, parity.SCORE_FLOOR + 1e-4], [1, 2])
    assert _report(eager, _answer([[10, 10, 50, 50]], [0.9], [1])).passed  # crossed the floor: tolerated
    eager["scores"][1] = parity.SCORE_FLOOR + 0.01
    assert not _report(eager, _answer([[10, 10, 50, 50]], [0.9], [1])).passed


@pytest.mark.unit
def test_parity_compares_masks_and_keypoints():
    m = torch.zeros(1, 1, 20, 20)
    m[..., 5:10, 5:10] = 0.8
    eager = _answer([[1, 1, 9, 9]], [0.9], [1], masks=m, keypoints=torch.tensor([[[3.0, 4.0, 1.0]]]))
    same = _answer([[1, 1, 9, 9]], [0.9], [1], masks=m + 0.001, keypoints=torch.tensor([[[3.1, 4.0, 0.0]]]))
    report = _report(eager, same)
    assert report.passed and report.max_mask_diff == pytest.approx(0.001, abs=1e-6)
    assert report.max_keypoint_diff == pytest.approx(0.1, abs=1e-5)  # visibility is not compared
    off = _answer([[1, 1, 9, 9]], [0.9], [1], masks=m * 0.5, keypoints=torch.tensor([[[5.0, 4.0, 1.0]]]))
    report = _report(eager, off)
    assert not report.passed and "max mask difference 0.4" in report.summary()
    assert "max keypoint difference 2 px" in report.summary()


class _ToyDetector(nn.Module):
    """The detection contract's shape (images in, dicts out) around a backbone and a head whose
    Python branch on the input size a trace freezes: the head must stay eager, with the reason."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = _ShapeDependentHead()

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for img in images:
            feat = self.backbone(img[None])
            score = self.head(feat).flatten()
            out.append({"boxes": torch.zeros(1, 4), "scores": score[:1].sigmoid(), "labels": torch.ones(1).long()})
        return out


class _ShapeDependentHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 40:  # a trace keeps the branch of its sample
            return x.mean(dim=(2, 3)) * 2
        return x.mean(dim=(2, 3))


@pytest.mark.integration
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_export_keeps_a_wrongly_traced_part_eager_and_says_why(tmp_path, runtime):
    model = _ToyDetector().eval()
    images = [torch.rand(3, 30, 50), torch.rand(3, 40, 30)]
    manifest = export_parts(model, images, tmp_path, RuntimeConfig(runtime))
    assert [p.path for p in manifest.exported] == ["backbone"]
    (head,) = manifest.eager
    assert head.path == "head" and "differs from eager" in head.eager_reason
    assert RuntimeManifest.read(tmp_path).eager[0].eager_reason == head.eager_reason  # recorded in runtime.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.onnx", "runtime.json"]
    fast = _ToyDetector().eval()
    accelerate(fast, tmp_path, RuntimeConfig(runtime), 1, torch.device("cpu"), wide_threads=2)
    assert type(fast.backbone).__name__ == "CompiledPart" and isinstance(fast.head, _ShapeDependentHead)
    choice = thread_choice(fast)
    assert (choice.narrow, choice.wide) == (1, 2) and fast.backbone.wide is not None
    for wide in (False, True):  # both sessions answer like eager
        choice.use_wide = wide
        for img in images + [torch.rand(3, 64, 48)]:
            with torch.no_grad():
                assert torch.allclose(model([img])[0]["scores"], fast([img])[0]["scores"], atol=1e-5)
    with pytest.raises(ValueError, match="rebuild the archive"):
        accelerate(_ToyDetector().eval(), tmp_path, RuntimeConfig("onnxruntime" if runtime == "openvino"
                                                                  else "openvino"), 1, torch.device("cpu"))


# --- every family exports (integration: random weights, small sizes) ------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("arch", sorted(available_archs()))
def test_every_family_exports_and_keeps_parity(arch, tmp_path):
    from .test_families import KWARGS

    n_classes = 2 if arch.startswith("keypoint") else 3
    torch.manual_seed(0)
    eager = build_model(arch, n_classes, **KWARGS[arch]).eval()
    g = torch.Generator().manual_seed(1)
    samples = [torch.rand(3, 200, 320, generator=g), torch.rand(3, 300, 200, generator=g)]
    manifest = export_parts(eager, samples, tmp_path, RuntimeConfig("onnxruntime"))
    # every dense part is either exported or named with its reason; the backbone always exports
    assert "backbone" in [p.path for p in manifest.exported]
    assert all(p.file or p.eager_reason for p in manifest.parts)
    torch.manual_seed(0)
    fast = build_model(arch, n_classes, **KWARGS[arch]).eval()
    accelerate(fast, tmp_path, RuntimeConfig("onnxruntime"), 1, torch.device("cpu"))
    images = [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for h, w in ((240, 320), (320, 240))]
    # random heads score low: compare down to the model's own score threshold, not the served floor
    report = parity.check_parity(eager, fast, images, warmup=0, floor=KWARGS[arch].get("score_thresh", 0.05))
    assert report.passed and report.detections > 0, report.summary()
    print(f"\n{arch}: exported {[p.path for p in manifest.exported]}, eager {[p.path for p in manifest.eager]}; "
          f"{report.summary()}")


@pytest.mark.unit
def test_precision_auto_keeps_the_fastest_within_the_tolerance():
    fp32 = precision.Scored("onnxruntime", "fp32", 12.0, {"bbox": 0.771, "segm": 0.70})
    bf16 = precision.Scored("openvino-bf16", "bf16", 10.0, {"bbox": 0.769, "segm": 0.699})
    int8 = precision.Scored("openvino-int8", "int8", 8.0, {"bbox": 0.770, "segm": 0.690})
    for c in (bf16, int8):
        precision.judge(fp32, c, 0.005)
    assert bf16.passed and bf16.drop == pytest.approx(0.002)
    assert not int8.passed and int8.drop == pytest.approx(0.01)  # the worst iou type decides
    assert "segm mAP 0.6900 is 0.0100 below fp32's 0.7000 (tolerance 0.005)" in int8.note
    assert precision.fastest_within(fp32, [bf16, int8]) is bf16
    slow = precision.Scored("openvino-bf16", "bf16", 13.0, {"bbox": 0.771, "segm": 0.70})
    precision.judge(fp32, slow, 0.005)
    assert precision.fastest_within(fp32, [slow]) is fp32  # within the tolerance but not faster
    record = precision.PrecisionRecord("openvino-bf16", "bf16", 0.005, "data/x", "valid", 100, fp32, [bf16, int8])
    assert record.summary().startswith("openvino-bf16 on 100 valid images: onnxruntime bbox mAP 0.7710")
    assert "openvino-int8 bbox mAP 0.7700, segm mAP 0.6900 8 ms (refused)" in record.summary()


@pytest.mark.unit
def test_precision_gate_set_skips_the_calibration_images_and_needs_labels(tmp_path):
    generate_split(tmp_path / "labelled", "valid", 30, seed=3, cfg=SynthConfig(), progress=False)
    labels = {int(k): v for k, v in json.loads(DEMO_LABELS.read_text()).items()}
    gate = precision.gate_set(tmp_path / "labelled", "valid", labels, skip=5, limit=100)
    assert gate is not None and gate.ids == list(range(6, 31)) and len(gate.images) == 25 and gate.skipped == 5
    assert {a["image_id"] for a in gate.gt["annotations"]} <= set(gate.ids) and gate.iou_types == ["bbox"]
    small = precision.gate_set(tmp_path / "labelled", "valid", labels, skip=16, limit=100)
    assert small.skipped == 0 and len(small.images) == 30  # too few left: every image, calibration included
    ann = tmp_path / "labelled" / "valid" / "_annotations.coco.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    assert precision.gate_set(tmp_path / "labelled", "valid", labels, skip=5, limit=100) is None
    assert precision.gate_set(tmp_path / "labelled", "valid", {0: "__background__", 1: "zebra"}, 5, 100) is None


@pytest.mark.unit
def test_ort_gpu_providers_follow_the_choice(monkeypatch):
    from serve_demo.core.runtime import ORT_GPU_ENV, RuntimeUnavailable, ort_gpu_providers

    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.delenv(ORT_GPU_ENV, raising=False)
    assert ort_gpu_providers(both, 1) == [("TensorrtExecutionProvider", {"device_id": 1}),
                                          ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert ort_gpu_providers(both, 0, "cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    monkeypatch.setenv(ORT_GPU_ENV, "tensorrt-fp16")
    assert ort_gpu_providers(both, 0)[0] == ("TensorrtExecutionProvider", {"device_id": 0, "trt_fp16_enable": True})
    with pytest.raises(RuntimeUnavailable, match="none of TensorrtExecutionProvider .*install onnxruntime-gpu"):
        ort_gpu_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], 0)
    with pytest.raises(RuntimeUnavailable, match="give one of cuda, tensorrt, tensorrt-fp16"):
        ort_gpu_providers(both, 0, "rocm")


@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_bench_without_cuda_says_where_to_run_it(capsys):
    from serve_demo.bench import command

    p = __import__("argparse").ArgumentParser()
    command.add_arguments(p)
    assert command.main(p.parse_args(["--device", "cuda", "--models", "demo"])) == 2
    assert "no CUDA device here. Run make bench DEVICE=cuda on a machine with an NVIDIA GPU" in capsys.readouterr().out


@pytest.mark.integration
def test_gpu_bench_variant_measurement_runs_on_the_cpu_too(tmp_path, parity_data, labelled_valid):
    """The GPU bench's per-variant measurement (timing, then the gate set's answers and mAP), here on the CPU:
    the code path a GPU run takes, without the GPU."""
    import queue

    from serve_demo.bench.gpu import _variant_worker
    from serve_demo.bench.runner import load_images

    mar = build(archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                             runtime="eager", export_path=str(tmp_path), build_dir=str(tmp_path / "b")))
    names = {k: v for k, v in json.loads(DEMO_LABELS.read_text()).items()}
    results: queue.Queue = queue.Queue()
    _variant_worker(str(mar), "", load_images(parity_data, "valid", 3), (str(labelled_valid), "valid", names),
                    results, device="cpu")
    got = results.get_nowait()
    assert "error" not in got, got
    assert got["throughput_rps"] > 0 and got["p50_ms"] > 0
    assert got["maps"]["bbox"] > 0.5 and len(got["outputs"]) == 44  # the trained demo model, 60 - 16 images


# --- archives: the gate accepts, refuses, records --------------------------------------------------

@pytest.fixture(scope="module")
def parity_data(tmp_path_factory):
    """A small synthetic validation split (boxes and masks), other images than the test split's."""
    root = tmp_path_factory.mktemp("parity-data")
    generate_split(root, "valid", 8, seed=1, cfg=SynthConfig(), progress=False, masks=True)
    return root


def _mar_files(mar) -> dict[str, bytes]:
    with zipfile.ZipFile(mar) as z:
        return {n: z.read(n) for n in z.namelist() if n.startswith("runtime/") or n == "model-config.yaml"}


@pytest.mark.integration
def test_accelerated_archive_needs_parity_images(tmp_path):
    spec = archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                        runtime="onnxruntime", export_path=str(tmp_path), build_dir=str(tmp_path / "b"))
    with pytest.raises(ArchiveError, match="needs validation images .*--parity-data"):
        build(spec)
    spec.parity_data = str(tmp_path / "nowhere")
    with pytest.raises(ArchiveError, match="parity images: "):
        build(spec)
    spec.no_check = True
    with pytest.raises(ArchiveError, match="no-check"):
        build(spec)
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.integration
def test_parity_gate_refuses_an_archive_that_answers_differently(tmp_path, parity_data, monkeypatch):
    """A runtime whose answers moved (here: every box regression nudged after export) is refused with
    the figures, and no archive is written."""
    from serve_demo.archive import accelerate as gate

    real = gate.accelerate

    def nudged(model, *args, **kw):
        manifest = real(model, *args, **kw)
        model.head.register_forward_hook(lambda _m, _a, out: {**out, "bbox_regression":
                                                             out["bbox_regression"] + 0.05})
        return manifest

    monkeypatch.setattr(gate, "accelerate", nudged)
    spec = archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                        runtime="onnxruntime", parity_data=str(parity_data), parity_images=4,
                        export_path=str(tmp_path), build_dir=str(tmp_path / "b"))
    with pytest.raises(ArchiveError, match=r"onnxruntime fails the parity gate: 4 images, \d+ detections: max box "
                                           r"difference [0-9.]+ px \(limit 0.5\).*worst: image"):
        build(spec)
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.integration
def test_whole_graph_traced_at_one_size_is_refused_when_it_answers_another_differently(tmp_path, parity_data):
    """GRAPH=whole: the classic exporter's whole fcos_tiny answers other image sizes up to ~2 px off eager
    (scripts/whole_graph.py): refused with the figures, nothing written."""
    spec = archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                        runtime="onnxruntime", graph="whole", parity_data=str(parity_data), parity_images=4,
                        export_path=str(tmp_path), build_dir=str(tmp_path / "b"))
    # refused by the export check (a second size) or by the gate (the parity images' sizes), with figures
    with pytest.raises(ArchiveError, match=r"onnxruntime-whole(: the whole graph traced on a \(\d+, \d+\) image "
                                           r"answers a \(\d+, \d+\) one unlike eager| fails the parity gate: "
                                           r".*max box difference [0-9.]+ px)"):
        build(spec)
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.unit
@pytest.mark.parametrize("levels", [[0, 1, 0, 2, 1, 1], [1, 1, 1], [2, 0], []])
def test_roi_levels_merged_by_gather_equal_torchvisions_scatter(levels):
    """The whole graph's RoIAlign merge (one gather) is torchvision's traced one (zeros + a scatter per level),
    exactly, empty levels and no boxes included."""
    from torchvision.ops.poolers import _onnx_merge_levels

    from serve_demo.archive.export import merge_levels_by_gather

    level = torch.tensor(levels, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    unmerged = [torch.randn(int((level == k).sum()), 4, 3, 3, generator=g) for k in range(3)]
    assert torch.equal(merge_levels_by_gather(level, unmerged), _onnx_merge_levels(level, unmerged))


@pytest.mark.integration
def test_whole_graph_int8_quantizes_the_dense_layers_and_answers(tmp_path):
    """GRAPH=whole in int8: the exported graph's Conv layers are quantized (QDQ) on the calibration images,
    the fp32 graph is not kept, and the int8 graph still finds what eager finds (judged by mAP at archive time;
    here: the same objects, boxes within a few pixels)."""
    import onnx

    from serve_demo.archive.export import WHOLE_INT8_FILE, export_whole

    model = build_model("fcos_tiny", 6).eval()
    model.load_state_dict(torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True))
    images = [torch.from_numpy(__import__("numpy").array(synth_image(s, (320, 240)))).permute(2, 0, 1).contiguous()
              for s in range(6)]
    floats = [im.float() / 255 for im in images]
    rt = RuntimeConfig("openvino", "int8", graph="whole")
    manifest = export_whole(model, floats[:2], tmp_path, rt, strict=False, calibration=floats[2:])
    assert manifest.exported[0].file == WHOLE_INT8_FILE and sorted(p.name for p in tmp_path.iterdir()) == [
        "model-int8.onnx", "runtime.json"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / WHOLE_INT8_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    fast = build_model("fcos_tiny", 6).eval()
    fast.load_state_dict(model.state_dict())
    accelerate(fast, tmp_path, rt, 1, torch.device("cpu"))
    report = parity.check_parity(model, fast, images[:2], warmup=0)
    assert report.detections > 0 and report.max_box_diff < 8, report.summary()


@pytest.mark.integration
def test_a_whole_graph_runtime_stands_in_for_the_model_call(tmp_path):
    """The worker's side of GRAPH=whole: ``model(images)`` answered by one graph per image, parity at the
    traced size (where the classic exporter's graph is exact)."""
    from serve_demo.archive.export import export_whole

    model = build_model("fcos_tiny", 6).eval()
    model.load_state_dict(torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True))
    image = synth_image(5, (320, 240))
    tensor = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1).contiguous()
    sample = tensor.float() / 255
    rt = RuntimeConfig("onnxruntime", graph="whole")
    manifest = export_whole(model, [sample, sample.flip(-1)], tmp_path, rt)  # one size: the check passes
    assert manifest.graph == "whole" and manifest.exported[0].out_spec == ["boxes", "scores", "labels"]
    fast = build_model("fcos_tiny", 6).eval()
    fast.load_state_dict(model.state_dict())
    accelerate(fast, tmp_path, rt, 1, torch.device("cpu"))
    assert thread_choice(fast) is None and isinstance(fast.whole_graph, nn.Module)
    report = parity.check_parity(model, fast, [tensor, tensor.flip(-1)], warmup=0)
    assert report.passed and report.detections > 0, report.summary()
    with pytest.raises(ValueError, match="graph"):  # an archive's config and its files must agree
        accelerate(build_model("fcos_tiny", 6).eval(), tmp_path, RuntimeConfig("onnxruntime"), 1, torch.device("cpu"))


# --- served side by side ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled_valid(tmp_path_factory):
    """A labelled synthetic validation split big enough for PRECISION=auto's mAP gate (16 calibration images,
    then 44 scored)."""
    root = tmp_path_factory.mktemp("labelled-valid")
    generate_split(root, "valid", 60, seed=2, cfg=SynthConfig(), progress=False)
    return root


@pytest.fixture(scope="module")
def runtime_store(tmp_path_factory, parity_data, labelled_valid):
    """The demo model eager, in ONNX Runtime and in OpenVINO (the last with the machine's default
    layout: no workers or threads fixed), with PRECISION=auto, and the mask model in ONNX Runtime."""
    root = tmp_path_factory.mktemp("runtime-store")
    store = root / "store"
    common = dict(export_path=str(store), build_dir=str(root / "build"), parity_data=str(parity_data),
                  parity_images=8)
    demo = dict(weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny")
    build(archive_args(name="shapes", runtime="eager", **demo, **common))
    build(archive_args(name="shapes_ort", runtime="onnxruntime", **demo, **common))
    build(archive_args(name="shapes_ov", runtime="openvino", workers=0, threads=0, **demo, **common))
    build(archive_args(name="shapes_auto", runtime="auto", precision="auto", **demo,
                       **{**common, "parity_data": str(labelled_valid)}))
    build(archive_args(name="masks", runtime="eager", weights=str(MASK_WEIGHTS), labels=str(MASK_LABELS),
                       arch="maskrcnn_tiny", **common))
    build(archive_args(name="masks_ort", runtime="onnxruntime", weights=str(MASK_WEIGHTS),
                       labels=str(MASK_LABELS), arch="maskrcnn_tiny", **common))
    return store


@pytest.fixture(scope="module")
def rt_server(tmp_path_factory, runtime_store):
    """A real TorchServe over those archives, with the access log turned on (SERVE_DEMO_ACCESS_LOG)."""
    ts = make_server(tmp_path_factory.mktemp("runtime-home"), runtime_store)
    ts.environment["SERVE_DEMO_ACCESS_LOG"] = "info"
    with ts.running(240, expect=["shapes", "shapes_ort", "shapes_ov", "shapes_auto", "masks", "masks_ort"]):
        yield ts


@pytest.mark.integration
def test_archive_records_runtime_parts_and_parity(runtime_store):
    for name, runtime, parts in (("shapes_ort", "onnxruntime", ["backbone", "head"]),
                                 ("shapes_ov", "openvino", ["backbone", "head"]),
                                 ("masks_ort", "onnxruntime", ["backbone", "rpn.head", "roi_heads.box_head",
                                                               "roi_heads.box_predictor", "roi_heads.mask_head",
                                                               "roi_heads.mask_predictor"])):
        files = _mar_files(runtime_store / f"{name}-1.0.mar")
        config = yaml.safe_load(files["model-config.yaml"])
        assert config["handler"]["runtime"] == {"name": runtime, "precision": "fp32"}
        manifest = json.loads(files["runtime/runtime.json"])
        assert [p["path"] for p in manifest["parts"] if p["file"]] == parts
        assert all(f"runtime/{p['file']}" in files for p in manifest["parts"] if p["file"])
        assert manifest["parity"]["passed"] and manifest["parity"]["images"] == 8
        assert manifest["parity"]["max_box_diff_px"] <= parity.BOX_TOL
    masks_parity = json.loads(_mar_files(runtime_store / "masks_ort-1.0.mar")["runtime/runtime.json"])["parity"]
    assert masks_parity["max_mask_diff"] <= parity.MASK_TOL
    eager = _mar_files(runtime_store / "shapes-1.0.mar")
    assert "runtime/runtime.json" not in eager
    assert "runtime" not in yaml.safe_load(eager["model-config.yaml"])["handler"]
    ov = yaml.safe_load(_mar_files(runtime_store / "shapes_ov-1.0.mar")["model-config.yaml"])
    assert "minWorkers" not in ov and not ov["handler"].get("threads")  # the serving machine decides


@pytest.mark.integration
def test_precision_auto_archives_the_fastest_within_the_tolerance(runtime_store):
    """PRECISION=auto: fp32 and OpenVINO bf16 / int8 (dense parts and whole graph) scored on the 44 labelled
    images after the calibration ones; the archive names the fastest within the tolerance and keeps every
    candidate's figures."""
    with zipfile.ZipFile(runtime_store / "shapes_auto-1.0.mar") as z:
        record = json.loads(z.read(precision.RECORD))
        config = yaml.safe_load(z.read("model-config.yaml"))
        manifest = json.loads(z.read("runtime/runtime.json")) if record["chosen"] != "eager" else None
    fp32, candidates = record["fp32"], record["candidates"]
    assert record["images"] == 44 and record["split"] == "valid" and record["tolerance"] == GATE_TOLERANCE
    assert fp32["maps"]["bbox"] > 0.5 and fp32["precision"] == "fp32"  # the trained demo model
    assert [c["runtime"] for c in candidates] == ["openvino-bf16", "openvino-whole-bf16", "openvino-int8",
                                                  "openvino-whole-int8"]
    for c in candidates:
        assert c["passed"] == (fp32["maps"]["bbox"] - c["maps"]["bbox"] <= GATE_TOLERANCE), c
    best = min([fp32, *(c for c in candidates if c["passed"])], key=lambda c: c["median_ms"])
    assert record["chosen"] == best["runtime"] and record["precision"] == best["precision"]
    runtime = config["handler"].get("runtime", {"name": "eager", "precision": "fp32"})
    assert runtime["precision"] == record["precision"] and runtime.get("graph", "parts") == best["graph"]
    if record["precision"] != "fp32":
        assert manifest["precision"] == record["precision"] and manifest["parity"]["map"] == best["maps"]
    print(f"\nprecision auto on the demo: {record['chosen']}; "
          + "; ".join(f"{c['runtime']} bbox mAP {c['maps']['bbox']:.4f} {c['median_ms']:.1f} ms"
                      for c in [fp32, *candidates]))


@pytest.mark.integration
def test_precision_auto_without_labels_stays_fp32_and_says_so(tmp_path, parity_data, caplog):
    unlabelled = tmp_path / "unlabelled"
    generate_split(unlabelled, "valid", 20, seed=4, cfg=SynthConfig(), progress=False)
    ann = unlabelled / "valid" / "_annotations.coco.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    spec = archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                        runtime="auto", precision="auto", parity_data=str(unlabelled), parity_images=4,
                        export_path=str(tmp_path), build_dir=str(tmp_path / "b"))
    with caplog.at_level("WARNING"):
        mar = build(spec)
    assert "has no annotations for this model's labels" in caplog.text and "stays fp32" in caplog.text
    with zipfile.ZipFile(mar) as z:
        record = json.loads(z.read(precision.RECORD))
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert record["precision"] == "fp32" and record["reason"] == "no labelled validation images"
    assert config["handler"].get("runtime", {}).get("precision", "fp32") == "fp32"
    with pytest.raises(ArchiveError, match="PRECISION=auto chooses among"):
        build(archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                           runtime="eager", precision="auto", export_path=str(tmp_path)))


def _tensors(payload: dict) -> dict[str, torch.Tensor]:
    dets = payload["detections"]
    out = {"boxes": torch.tensor([d["box"] for d in dets], dtype=torch.float32).reshape(-1, 4),
           "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
           "labels": torch.tensor([d["label_id"] for d in dets])}
    return out


def _mask_ious(a: dict, b: dict) -> list[float]:
    """IoU of each detection's binarised mask with the mask of the other answer's nearest box."""
    ious = []
    boxes_b = torch.tensor([d["box"] for d in b["detections"]]).reshape(-1, 4)
    for d in a["detections"]:
        j = int((boxes_b - torch.tensor(d["box"])).abs().amax(dim=1).argmin())
        x, y = masks.decode(d["mask"]).astype(bool), masks.decode(b["detections"][j]["mask"]).astype(bool)
        ious.append(float((x & y).sum() / max(1, (x | y).sum())))
    return ious


@pytest.mark.server
@pytest.mark.parametrize("eager,fast", [("shapes", "shapes_ort"), ("shapes", "shapes_ov"), ("masks", "masks_ort")])
def test_served_accelerated_answers_equal_eager(rt_server, eager, fast):
    report = parity.ParityReport()
    for seed in range(5):
        data = encode(synth_image(100 + seed))
        payloads = []
        for model in (eager, fast):
            r = post(rt_server, model, data, {"X-Response-Format": "detailed", "X-Threshold": str(parity.SCORE_FLOOR)})
            assert r.status_code == 200, r.text
            payloads.append(r.json())
        parity.compare(_tensors(payloads[0]), _tensors(payloads[1]), report, f"seed {seed}")
        report.images += 1
        if eager == "masks":  # binarised masks: a probability 1e-6 from the threshold may flip an edge pixel
            assert min(_mask_ious(*payloads), default=1.0) >= 0.99
    assert report.detections > 20
    assert report.passed, report.summary()


@pytest.mark.server
def test_served_map_equals_eager(rt_server, test_split, tmp_path):
    mgmt = Management(rt_server.management_url, home=rt_server.home)
    results = {m: evaluate(test_split, "test", model=m, url=rt_server.inference_url, management=mgmt,
                           store=rt_server.model_store, out=tmp_path / m, samples=0,
                           token=rt_server.key("inference"))
               for m in ("shapes", "shapes_ort", "shapes_ov", "shapes_auto")}
    base = results["shapes"]["metrics"]["coco"]["mAP"]
    assert base > 0.5  # the trained demo model
    for m in ("shapes_ort", "shapes_ov"):
        assert not results[m]["failures"]
        got = results[m]["metrics"]["coco"]["mAP"]
        assert abs(got - base) <= 0.002, (m, got, base)
    # PRECISION=auto, judged on the validation split, served on the test split: within the gate's tolerance
    # (and a little more: other images)
    assert not results["shapes_auto"]["failures"]
    auto = results["shapes_auto"]["metrics"]["coco"]["mAP"]
    print(f"\ntest mAP: eager {base:.4f}, PRECISION=auto {auto:.4f}")
    assert auto >= base - 2 * GATE_TOLERANCE, (auto, base)


@pytest.mark.server
def test_default_layout_and_runtime_in_the_workers(rt_server):
    layout = cpu_layout()
    info = requests.get(f"{rt_server.management_url}/models/shapes_ov", headers=rt_server.auth(), timeout=10).json()
    assert len(info[0]["workers"]) == layout.workers
    log = (rt_server.home / "logs" / "model_log.log").read_text(errors="replace")
    wide = f", runtime {layout.runtime_threads} threads when alone" if layout.runtime_threads > layout.threads else ""
    assert f"shapes_ov 1.0 ready on cpu (openvino, {layout.threads} threads{wide})" in log, log[-3000:]
    # an archive that fixes its threads (the tests' archives: 1) gets them for the runtime too
    assert "shapes_ort 1.0 ready on cpu (onnxruntime, 1 threads)" in log
    assert "runtime onnxruntime: ['backbone', 'head'] run in onnxruntime" in log


@pytest.mark.server
def test_frontend_logs_no_line_per_request(rt_server):
    logs = rt_server.home / "logs"
    before = {f: len((logs / f).read_text(errors="replace").splitlines()) for f in ("ts_log.log", "model_log.log")}
    access_before = len((logs / "access_log.log").read_text().splitlines())
    data = encode(synth_image(3))
    for _ in range(10):
        assert post(rt_server, "shapes", data).status_code == 200
    after = {f: len((logs / f).read_text(errors="replace").splitlines()) for f in before}
    assert after == before, "per-request lines are back in ts_log.log/model_log.log (docker/log4j2.xml)"
    access = (logs / "access_log.log").read_text().splitlines()[access_before:]
    assert len(access) == 10 and all("/predictions/shapes" in line for line in access)  # opted in here


@pytest.mark.server
def test_access_log_is_off_by_default(server):
    data = encode(synth_image(4))
    assert post(server, "shapes", data).status_code == 200
    assert (server.home / "logs" / "access_log.log").read_text() == ""


@pytest.mark.unit
def test_bench_warm_up_sends_for_the_time_given_from_every_thread():
    """make bench warms each server up for --warmup-seconds before measuring it: every client thread sends,
    and the count it returns is what was sent."""
    from serve_demo.bench.runner import warm_up

    seen: list[bytes] = []
    lock = threading.Lock()

    def send(_session, data: bytes) -> bool:
        time.sleep(0.01)
        with lock:
            seen.append(data)
        return True

    t0 = time.monotonic()
    sent = warm_up(send, [b"a", b"b", b"c", b"d"], 0.2, concurrency=4)
    assert time.monotonic() - t0 >= 0.2 and sent == len(seen) >= 8
    assert set(seen) == {b"a", b"b", b"c", b"d"}  # thread k starts at image k
    assert warm_up(send, [b"a"], 0.0, concurrency=2) == 2  # no time: one request per thread


@pytest.mark.unit
def test_bench_load_phase_runs_for_its_images_and_its_shortest_time():
    """A load phase sends at least its number of requests and lasts at least --phase-seconds; the figures
    count what was answered."""
    from serve_demo.bench.runner import load

    calls = []

    def send(_session, data: bytes) -> bool:
        time.sleep(0.005)
        calls.append(data)
        return data != b"bad"

    quick = load(send, [b"a", b"bad"], 2, 6)  # no shortest time: the images decide
    assert quick["requests"] == 6 == len(calls) and quick["errors"] == 3
    calls.clear()
    t0 = time.monotonic()
    timed = load(send, [b"a"], 2, 2, min_seconds=0.2)
    assert time.monotonic() - t0 >= 0.2 and timed["requests"] == len(calls) > 2
    assert timed["throughput_rps"] > 0 and len(timed["latencies"]) == timed["requests"]
