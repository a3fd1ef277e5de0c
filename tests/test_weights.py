"""Weights and label maps as users have them: a PyTorch Lightning checkpoint (its module's
attribute prefix found and stripped, or named), clear errors when nothing fits, repeated names
refused unless kept. Also: the worker core travels in the archive as a folder."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from serve_demo.archive.builder import ArchiveError, build
from serve_demo.core.models import build_model, fit_state_dict
from serve_demo.core.worker import Worker
from tests.conftest import ROOT, archive_args, encode, synth_image


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A real PyTorch Lightning checkpoint: fcos_tiny as ``self.model`` of a LightningModule, one step."""
    import pytorch_lightning as pl

    class Detect(pl.LightningModule):
        def __init__(self, num_classes: int = 6, lr: float = 1e-3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = build_model("fcos_tiny", num_classes)

        def training_step(self, batch, _):
            images, targets = batch
            return sum(self.model(images, targets).values())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    data = [([torch.rand(3, 96, 128)], [{"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([1])}])]
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    module = Detect()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    path = tmp_path_factory.mktemp("lightning") / "detect.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in module.model.state_dict().items()}


@pytest.fixture
def labels6(tmp_path):
    path = tmp_path / "labels6.json"
    path.write_text(json.dumps({"0": "__background__", **{str(i): f"c{i}" for i in range(1, 6)}}))
    return path


def dirs(tmp_path) -> dict:
    return dict(export_path=str(tmp_path / "store"), build_dir=str(tmp_path / "build"))


@pytest.mark.integration
def test_lightning_checkpoint_archived_with_prefix_stripped(tmp_path, lightning_ckpt, labels6):
    ckpt, state = lightning_ckpt
    mar = build(archive_args(name="lit", weights=str(ckpt), labels=str(labels6), arch="fcos_tiny", **dirs(tmp_path)))
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        archived = torch.load(z.open(manifest["serializedFile"]), weights_only=True)
    assert sorted(archived) == sorted(state)  # the state_dict alone: no optimizer, no "model." prefix
    assert all(torch.equal(archived[k], state[k]) for k in state)
    detector = Worker.from_archive(mar)
    try:
        image = synth_image(1)
        payload = detector.predict(encode(image), threshold=0.0)
        assert isinstance(payload["detections"], list)
        assert payload["model"] == "lit" and payload["image_size"] == list(image.size), payload
    finally:
        detector.close()


@pytest.mark.integration
def test_named_prefix_used_and_a_wrong_one_refused(tmp_path, lightning_ckpt, labels6):
    ckpt, _ = lightning_ckpt
    build(archive_args(name="lit", weights=str(ckpt), labels=str(labels6), arch="fcos_tiny", weights_prefix="model.",
                       **dirs(tmp_path)))
    with pytest.raises(ArchiveError, match=r"the prefix 'net\.' maps 0 of the model's \d+ keys.*WEIGHTS_PREFIX"):
        build(archive_args(name="lit", weights=str(ckpt), labels=str(labels6), arch="fcos_tiny",
                           weights_prefix="net.", **dirs(tmp_path)))


@pytest.mark.integration
def test_checkpoint_of_another_architecture_named(tmp_path, lightning_ckpt, labels6):
    ckpt, _ = lightning_ckpt
    with pytest.raises(ArchiveError, match="does not fit FCOS|does not fit RetinaNet|unexpected keys"):
        build(archive_args(name="lit", weights=str(ckpt), labels=str(labels6), arch="retinanet_resnet50_fpn",
                           **dirs(tmp_path)))


@pytest.mark.unit
def test_fit_state_dict_prefixes():
    model_keys = ["a.w", "b.w", "bn.num_batches_tracked"]
    state = {"model.a.w": torch.zeros(1), "model.b.w": torch.zeros(1), "ema.a.w": torch.zeros(1)}
    fitted, prefix = fit_state_dict(model_keys, state)
    assert prefix == "model." and sorted(fitted) == ["a.w", "b.w"]
    plain = {"a.w": torch.zeros(1), "b.w": torch.zeros(1)}
    assert fit_state_dict(model_keys, plain) == (plain, "")
    assert fit_state_dict(model_keys, {"x": torch.zeros(1)}) == ({"x": torch.zeros(1)}, "")  # load_weights names it


@pytest.mark.unit
def test_not_a_state_dict_named(tmp_path, labels6):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3, "notes": "no weights here"}, path)
    with pytest.raises(ArchiveError, match="does not hold a state_dict.*'epoch'"):
        build(archive_args(name="x", weights=str(path), labels=str(labels6), arch="fcos_tiny", **dirs(tmp_path)))


@pytest.mark.unit
def test_repeated_label_names_refused_unless_kept(tmp_path):
    """Aquarium's real label map maps 6 and 7 both to "starfish"."""
    labels = tmp_path / "aquarium.json"
    labels.write_text(json.dumps({"0": "creatures", "1": "fish", "2": "jellyfish", "3": "penguin",
                                  "4": "puffin", "5": "shark", "6": "starfish", "7": "starfish", "8": "stingray"}))
    weights = tmp_path / "w.pt"
    torch.save(build_model("fcos_tiny", 9).state_dict(), weights)
    with pytest.raises(ArchiveError, match=r"'starfish' is ids 6, 7.*--keep-duplicate-labels"):
        build(archive_args(name="aq", weights=str(weights), labels=str(labels), arch="fcos_tiny", **dirs(tmp_path)))
    mar = build(archive_args(name="aq", weights=str(weights), labels=str(labels), arch="fcos_tiny",
                             keep_duplicate_labels=True, **dirs(tmp_path)))
    assert mar.is_file()


@pytest.mark.integration
def test_archive_carries_the_core_package_as_a_folder(model_store):
    names = set(zipfile.ZipFile(model_store / "shapes-1.0.mar").namelist())
    core = {f"serve_demo/core/{p.name}" for p in (ROOT / "serve_demo" / "core").glob("*.py")}
    assert core <= names and "serve_demo/__init__.py" in names
    assert not any(n.startswith(("serve_demo/serve/", "serve_demo/train/")) for n in names)


@pytest.mark.unit
def test_cli_imports_only_the_command_it_runs():
    """``serve_demo stop`` (and ``--help``) must not load torch or kserve."""
    code = ("import sys; from serve_demo import cli; cli.build_parser(['stop']); "
            "print(sorted(m for m in ('torch', 'kserve', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "serve_demo", "--help"], capture_output=True, text=True,
                               check=True, cwd=ROOT).stdout
    assert "archive" in help_text and "convert-pennfudan" in help_text


@pytest.mark.unit
def test_defaults_written_once():
    """The Makefile's defaults, argparse's and the shipped TorchServe config agree with defaults.py."""
    from serve_demo.core import defaults
    from serve_demo.serve.torchserve import read_properties

    made = subprocess.run([sys.executable, "serve_demo/core/defaults.py", "--make"], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout
    assert f"INFERENCE_PORT ?= {defaults.INFERENCE_PORT}\n" in made and "HOME_DIR ?= build/server\n" in made
    props = read_properties(ROOT / "docker" / "config.properties")
    assert int(props["max_request_size"]) == defaults.MAX_REQUEST_SIZE
