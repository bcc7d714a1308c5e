"""``bench serving``'s plain baseline server and ``bench autopilot``'s arithmetic, without Ray."""
import pytest
import torch

from gating.model import GatedModel


def test_the_plain_baseline_server_answers_as_the_model_does(gated_checkpoint, image_dir):
    from fastapi.testclient import TestClient
    from torchvision.io import decode_image

    from benchmarks.plain_server import make_app
    from training.data import normalize

    client = TestClient(make_app(str(gated_checkpoint), threads=1))
    assert client.get("/v2/health/ready").json() == {"ready": True}
    model = GatedModel.load(gated_checkpoint)
    for path in sorted((image_dir / "train").glob("*/*.jpg"))[:6]:
        answer = client.post("/v1/predict", content=path.read_bytes()).json()
        x = normalize(decode_image(str(path))[None], model.card.mean, model.card.std)
        with torch.inference_mode():
            out = model(x)
        assert answer["index"] == int(out.logits.argmax()) and answer["units_executed"] == int(out.units_executed[0])
    bad = client.post("/v1/predict", content=b"not an image")
    assert bad.status_code == 415 or bad.status_code == 400


def test_the_expected_accuracy_drop_is_weighted_by_the_time_each_cap_was_served():
    from benchmarks.autopilot import time_weighted

    caps = [(1.0, 1.0), (3.0, 0.5), (4.0, None)]  # the first answer's cap counts from the phase's start
    drop = {1.0: 0.0, 0.5: 2.0, None: 0.0}
    assert time_weighted(caps, 10.0, drop.get) == pytest.approx(2.0 * 1.0 / 10.0)
    assert time_weighted([], 10.0, drop.get) is None
