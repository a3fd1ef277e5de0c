"""Training through the real command line on a tiny generated dataset: checkpoint, resume, export."""

from __future__ import annotations

import json

import pytest
import torch

from serve_demo import cli
from serve_demo.data.synth import generate

pytestmark = pytest.mark.integration  # this file's layer (conftest.py: every test declares one)


def test_train_cli_checkpoints_resumes_and_exports(tmp_path):
    data = generate(tmp_path / "data", seed=3, train=8, valid=4, test=2, progress=False)
    argv = ["train", "--data", str(data), "--name", "tiny", "--arch", "fcos_tiny", "--epochs", "2",
            "--batch-size", "4", "--eval-every", "1", "--threads", "1", "--workers", "0",
            "--run-dir", str(tmp_path / "run"), "--weights-dir", str(tmp_path / "w"),
            "--labels-dir", str(tmp_path / "labels"), "--fp16"]
    assert cli.main([*argv[:8], "1", *argv[9:]]) == 0  # one epoch, then resume to two
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["args"]["name"] == "tiny"
    assert cli.main(argv) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "valid_mAP" in history[-1]
    state = torch.load(tmp_path / "w" / "tiny.pt")
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    labels = json.loads((tmp_path / "labels" / "tiny.json").read_text())
    assert labels["0"] == "__background__" and len(labels) == 6


def test_mask_model_trains_from_a_backbone_and_reports_segm(tmp_path):
    """maskrcnn_tiny on a tiny mask split: masks reach the loss, --init-backbone takes the demo's
    backbone, validation reports segm mAP, and the export archives and answers with masks."""
    from serve_demo.archive.builder import build
    from serve_demo.core.worker import Worker

    from .conftest import DEMO_WEIGHTS, archive_args, encode, synth_image

    data = generate(tmp_path / "data", seed=4, train=4, valid=2, test=1, progress=False, masks=True)
    argv = ["train", "--data", str(data), "--name", "tinymask", "--arch", "maskrcnn_tiny", "--epochs", "1",
            "--batch-size", "2", "--eval-every", "1", "--threads", "1", "--workers", "0",
            "--init-backbone", str(DEMO_WEIGHTS), "--run-dir", str(tmp_path / "run"),
            "--weights-dir", str(tmp_path / "w"), "--labels-dir", str(tmp_path / "labels")]
    assert cli.main(argv) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"loss_loss_mask", "valid_mAP", "valid_segm_mAP", "valid_segm_mAP_50"} <= set(history[-1])
    state = torch.load(tmp_path / "w" / "tinymask.pt")
    demo = torch.load(DEMO_WEIGHTS)
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    # started from the demo's backbone (a random one would be far away), then trained a little
    stem, demo_stem = state["backbone.stem.0.0.weight"].float(), demo["backbone.stem.0.0.weight"].float()
    assert torch.allclose(stem, demo_stem, atol=1e-2)
    mar = build(archive_args(name="tinymask", weights=str(tmp_path / "w" / "tinymask.pt"), arch="maskrcnn_tiny",
                             labels=str(tmp_path / "labels" / "tinymask.json"), export_path=str(tmp_path / "store"),
                             build_dir=str(tmp_path / "build")))
    answer = Worker.from_archive(mar).predict(encode(synth_image(1)), threshold=0.0)
    assert all("mask" in d for d in answer["detections"])
