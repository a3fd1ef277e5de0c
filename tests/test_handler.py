"""The handler in-process with TorchServe's MockContext (no server): exact numbers from the
deterministic FixedDetector, per-request errors inside a batch, config from model-config.yaml."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml
from ts.context import Context, RequestProcessor
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from tests.conftest import ASSETS, ROOT, encode, synth_image

sys.path.insert(0, str(ROOT / "handlers"))
from detector_handler import DetectorHandler  # noqa: E402

pytestmark = pytest.mark.integration  # this file's layer (conftest.py: every test declares one)


class BatchContext(MockContext):
    """MockContext plus TorchServe's real per-request header/status plumbing."""

    get_request_header = Context.get_request_header
    get_all_request_header = Context.get_all_request_header
    set_response_status = Context.set_response_status
    set_response_content_type = Context.set_response_content_type
    set_response_header = Context.set_response_header
    get_response_headers = Context.get_response_headers
    get_response_content_type = Context.get_response_content_type
    get_response_status = Context.get_response_status

    def with_requests(self, headers: list[dict]) -> BatchContext:
        self._request_processor = [RequestProcessor(h) for h in headers]
        return self


@pytest.fixture
def model_dir(tmp_path, fixed_weights):
    shutil.copy(ASSETS / "fixed_detector.py", tmp_path / "fixed_detector.py")
    shutil.copy(fixed_weights, tmp_path / "fixed.pt")
    shutil.copy(ASSETS / "fixed_labels.json", tmp_path / "index_to_name.json")
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump({"handler": {"threshold": 0.5, "threads": 1}}))
    yield tmp_path
    sys.modules.pop("fixed_detector", None)


@pytest.fixture
def context(model_dir):
    ctx = BatchContext(model_pt_file="fixed.pt", model_dir=str(model_dir), model_file="fixed_detector.py",
                       model_name="fixed", model_yaml_config_file="model-config.yaml")
    ctx.manifest["model"].update({"modelName": "fixed", "modelVersion": "2.0"})
    return ctx


@pytest.fixture
def handler(context):
    h = DetectorHandler()
    h.initialize(context)
    return h


def test_stock_format_threshold_and_unknown_label(handler, context):
    img = encode(synth_image(1, (200, 100)))
    out = handler.handle([{"body": img}, {"body": img}], context.with_requests([{}, {"X-Threshold": "0.25"}]))
    first, second = (json.loads(o) for o in out)
    assert first == [{"circle": [0.0, 0.0, 100.0, 50.0], "score": 0.9},
                     {"square": [50.0, 25.0, 199.0, 99.0], "score": 0.6}]
    assert second[-1] == {"7": [1.0, 2.0, 3.0, 4.0], "score": 0.3}  # id missing from the map
    assert context.get_response_content_type(0) == "application/json"


def test_detailed_mixed_sizes_and_errors_in_one_batch(handler, context):
    rows = [{"body": encode(synth_image(2, (320, 240)))}, {"body": b"not an image"},
            {"data": encode(synth_image(3, (97, 211)), "PNG")}, {"body": encode(synth_image(4, (64, 64)))}]
    headers = [{"X-Response-Format": "detailed"}, {}, {"x-response-format": "DETAILED"}, {"X-Threshold": "abc"}]
    out = handler.handle(rows, context.with_requests(headers))
    a, err, b, bad_thr = (json.loads(o) for o in out)
    assert a["image_size"] == [320, 240] and b["image_size"] == [97, 211]
    assert (a["model"], a["version"]) == ("fixed", "2.0")
    assert b["detections"][1]["box"] == [24.25, 52.75, 96.0, 210.0]
    assert err["code"] == 415 and context.get_response_status(1)[0] == 415
    assert bad_thr["type"] == "invalid_threshold" and context.get_response_status(3)[0] == 400
    assert context.get_response_status(0)[0] == 200


def test_missing_label_map_fails_naming_it(model_dir, context):
    (model_dir / "index_to_name.json").unlink()
    with pytest.raises(FileNotFoundError, match="index_to_name.json"):
        DetectorHandler().initialize(context)


def test_bad_config_fails_naming_key(model_dir, context):
    context.model_yaml_config = {"handler": {"thresold": 0.2}}
    with pytest.raises(ValueError, match="thresold"):
        DetectorHandler().initialize(context)
