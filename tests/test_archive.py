"""Archive-time checks: a wrong combination fails here, naming the mismatch, not at serve time."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from serve_demo.archive.builder import ArchiveError, build
from serve_demo.core.models import build_model
from tests.conftest import ASSETS, archive_args

pytestmark = pytest.mark.integration  # this file's layer (conftest.py: every test declares one)


@pytest.fixture
def dirs(tmp_path):
    return dict(export_path=str(tmp_path / "store"), build_dir=str(tmp_path / "build"))


@pytest.fixture
def labels6(tmp_path):
    path = tmp_path / "labels6.json"
    path.write_text(json.dumps({str(i): f"c{i}" for i in range(6)}))
    return path


def test_archive_contents(tmp_path, dirs, labels6):
    weights = tmp_path / "w.pt"
    torch.save(build_model("fcos_tiny", 6).state_dict(), weights)
    mar = build(archive_args(name="det", version="2.0", weights=str(weights), labels=str(labels6),
                             arch="fcos_tiny", **dirs))
    assert mar.name == "det-2.0.mar" and mar.parent.name == "store"
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"w.pt", "index_to_name.json", "model-config.yaml", "detector_handler.py",
            "serve_demo/core/pipeline.py", "serve_demo/core/models.py", "MAR-INF/MANIFEST.json"} <= names
    manifest = json.loads(zipfile.ZipFile(mar).read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelVersion"] == "2.0"


@pytest.mark.parametrize("name,version,match", [
    ("det", "2.0/../x", "version '2.0/../x' must be letters"),
    ("my-det", "1.0", "must not contain '-'"),
    ("", "1.0", "model name '' must be"),
])
def test_bad_name_or_version_named(dirs, labels6, name, version, match):
    with pytest.raises(ArchiveError, match=match):
        build(archive_args(name=name, version=version, weights="w.pt", labels=str(labels6), **dirs))


def test_label_map_size_mismatch_named(tmp_path, dirs):
    weights = tmp_path / "w.pt"
    torch.save(build_model("fcos_tiny", 6).state_dict(), weights)
    labels = tmp_path / "l.json"
    labels.write_text(json.dumps({"0": "__background__", "1": "a", "2": "b"}))
    with pytest.raises(ArchiveError, match=r"shape mismatch.*label map names 3 classes"):
        build(archive_args(name="det", weights=str(weights), labels=str(labels), arch="fcos_tiny", **dirs))


def test_wrong_architecture_named(tmp_path, dirs, labels6):
    weights = tmp_path / "w.pt"
    torch.save(build_model("fcos_tiny", 6).state_dict(), weights)
    with pytest.raises(ArchiveError, match="does not fit"):
        build(archive_args(name="det", weights=str(weights), labels=str(labels6),
                           arch="fasterrcnn_mobilenet_v3_large_320_fpn", **dirs))


def test_missing_files_named(tmp_path, dirs, labels6):
    with pytest.raises(ArchiveError, match="weights file .*nope.pt not found"):
        build(archive_args(name="det", weights=str(tmp_path / "nope.pt"), labels=str(labels6), **dirs))


def test_model_file_class_count_vs_labels(tmp_path, dirs, labels6):
    """The seed's Oxford Pets model file (3 classes) with a 6-class label map is refused."""
    weights = tmp_path / "pets.pt"
    torch.save(build_model("fasterrcnn_resnet50_fpn", 3).state_dict(), weights)
    with pytest.raises(ArchiveError, match="predicts 3 classes .* label map names 6"):
        build(archive_args(name="pets", weights=str(weights), labels=str(labels6),
                           model_file=str(ASSETS / "pets_model.py"), no_check=False, **dirs))
