"""The whole detector exported against the dense parts exported, per family, on a quiet machine.

    .venv/bin/python scripts/whole_graph.py [--models demo,frcnn,r50] [--images 8] [--threads 2]

``make archive`` exports a detector's dense parts (backbone, heads) and keeps torchvision's transform,
anchors, RoIAlign, NMS and box decoding in torch. The classic ONNX exporter can also export the
whole ``model([image])`` call, transform and post-processing included. For each model this script
measures, on the parity images (the served path, one image at a time, ``--threads`` threads):

* eager torch;
* the dense parts in ONNX Runtime and in OpenVINO (what ``make archive`` builds);
* the whole graph in ONNX Runtime and in OpenVINO (``torch.onnx.export(dynamo=False)``, opset 17,
  height and width dynamic);

on images cropped to different sizes (the dataset's are all one size, and a trace can freeze one),

checking each against eager with the archive's parity gate (:mod:`serve_demo.archive.parity`).
It prints a table (median ms per image, speed-up over eager, the gate's verdict) and writes
``reports/whole_graph.json``. Random-weight models keep up to 1,000 proposals, as an untrained model
does; figures are compute, not accuracy. Check ``uptime`` first: another job halves them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_demo.archive.accelerate import sample_images  # noqa: E402
from serve_demo.archive.export import export_parts  # noqa: E402
from serve_demo.archive.parity import answer, compare_answers, validation_images  # noqa: E402
from serve_demo.core.loader import read_label_map  # noqa: E402
from serve_demo.core.models import build_model  # noqa: E402
from serve_demo.core.runtime import RuntimeConfig, accelerate, open_session  # noqa: E402

log = logging.getLogger("whole_graph")

MODELS = {  # key: (architecture, committed weights or None for seeded random ones)
    "demo": ("fcos_tiny", ROOT / "weights" / "shapes.pt"),
    "frcnn": ("fasterrcnn_mobilenet_v3_large_fpn", None),
    "r50": ("fasterrcnn_resnet50_fpn", None),
}
LABELS = ROOT / "index_to_name" / "shapes.json"


class WholeGraph(nn.Module):
    """``model(images)`` answered by one compiled graph per image (what a whole-graph archive would run)."""

    def __init__(self, session, keys: list[str]) -> None:
        super().__init__()
        self.session, self.keys = session, keys  # the outputs, in the eager answer's key order

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            answer = dict(zip(self.keys, self.session.run([image])))
            answer["labels"] = answer["labels"].long()
            out.append(answer)
        return out


def varied(image: torch.Tensor, i: int) -> torch.Tensor:
    """The ``i``-th image cropped to its own size and aspect (the dataset's are all one size): a graph whose
    trace froze a size answers the others wrongly, and the gate sees it."""
    h, w = image.shape[1:]
    return image[:, : h - (i * 37) % (h // 2), : w - (i * 53) % (w // 2)].contiguous()


def eager_model(key: str) -> nn.Module:
    arch, weights = MODELS[key]
    torch.manual_seed(0)
    model = build_model(arch, len(read_label_map(LABELS)))
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def export_whole(model: nn.Module, sample: torch.Tensor, path: Path) -> list[str]:
    """Export ``model([image])``; the names of its outputs, in order (the answer's keys)."""
    with torch.no_grad():
        keys = list(model([sample])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([sample],), str(path), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=keys, dynamic_axes={"image": [1, 2], **{k: [0] for k in keys}},
                          do_constant_folding=True)
    return keys


def measure(key: str, images: list[torch.Tensor], threads: int, work: Path) -> list[dict]:
    torch.set_num_threads(threads)
    eager = eager_model(key)
    reference = answer(eager, images)
    rows = [{"model": key, "variant": "eager torch", "median_ms": round(reference.median_ms, 1), "speedup": 1.0,
             "parity": "-", "export_s": 0.0}]
    samples = sample_images(images)  # the archive's: a wide and a tall crop, so every size dimension varies
    whole_path = work / f"{key}-whole.onnx"
    t0 = time.perf_counter()
    try:
        keys = export_whole(eager, samples[0], whole_path)
        whole_error = None
    except Exception as exc:  # noqa: BLE001 - a family that does not export is a result
        whole_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    whole_s = time.perf_counter() - t0
    for runtime in ("onnxruntime", "openvino"):
        rt = RuntimeConfig(runtime)
        folder = work / f"{key}-{runtime}-dense"
        t0 = time.perf_counter()
        export_parts(eager_model(key), samples, folder, rt, threads).write(folder)
        dense_s = time.perf_counter() - t0
        dense = eager_model(key)
        accelerate(dense, folder, rt, threads, torch.device("cpu"))
        variants = [(f"dense parts, {runtime}", dense, dense_s, None)]
        if whole_error is None:
            try:
                whole = WholeGraph(open_session(whole_path, rt, threads, torch.device("cpu")), keys)
                variants.append((f"whole graph, {runtime}", whole, whole_s, None))
            except Exception as exc:  # noqa: BLE001
                variants.append((f"whole graph, {runtime}", None, whole_s,
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
        else:
            variants.append((f"whole graph, {runtime}", None, whole_s, whole_error))
        for name, model, export_s, error in variants:
            if model is None:
                rows.append({"model": key, "variant": name, "median_ms": None, "speedup": None,
                             "parity": f"does not run: {error}", "export_s": round(export_s, 1)})
                continue
            try:
                got = answer(model, images)
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": key, "variant": name, "median_ms": None, "speedup": None,
                             "parity": f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                             "export_s": round(export_s, 1)})
                continue
            report = compare_answers(reference, got)
            verdict = "passes" if report.passed else "FAILS"
            rows.append({"model": key, "variant": name, "median_ms": round(got.median_ms, 1),
                         "speedup": round(reference.median_ms / got.median_ms, 2),
                         "parity": f"{verdict} (box {report.max_box_diff:.2g} px, score {report.max_score_diff:.2g}, "
                                   f"{report.unmatched} unmatched)",
                         "export_s": round(export_s, 1)})
            log.info("%s %s: %s", key, name, rows[-1])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,frcnn,r50", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--images", type=int, default=8, help="parity images per model (data/shapes valid)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dataset", default=str(ROOT / "data" / "shapes"))
    p.add_argument("--out", default=str(ROOT / "reports" / "whole_graph.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    images = [varied(im, i) for i, im in enumerate(validation_images(args.dataset, "valid", args.images))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            rows += measure(key, images, args.threads, Path(tmp))
    load = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load_before_end": load, "threads": args.threads, "rows": rows}, indent=1))
    print(f"\n{len(images)} images of {args.dataset} (valid), {args.threads} threads, load {load[0]:.2f}")
    print("| model | variant | median ms / image | x eager | parity gate | export s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['median_ms'] if r['median_ms'] is not None else '-'} | "
              f"{r['speedup'] if r['speedup'] is not None else '-'} | {r['parity']} | {r['export_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
