"""Training through the real command line on a tiny generated dataset: checkpoint, resume, export."""

from __future__ import annotations

import json

import torch

from serve_demo import cli
from serve_demo.synth import generate


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
