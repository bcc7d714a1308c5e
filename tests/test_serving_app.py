"""The real application on Ray Serve: HTTP routes, a standard v2 client, metrics, and bad input.

One server (a tiny gated model on the tiny image set) is started for the module; the tests
talk to it over loopback like any client would.
"""
import base64
import json
import struct
import time
import zlib
from pathlib import Path
from types import MethodType, SimpleNamespace

import numpy as np
import pytest
import torch

from gating.model import GatedModel
from tests.conftest import CLASSES

httpx = pytest.importorskip("httpx", reason="the serving tests' HTTP client")
pytest.importorskip("ray.serve", reason="Ray Serve is the server under test")
from serving.monitor import scrape as metric_values, total  # noqa: E402
from serving.process import ServerProcess  # noqa: E402

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def checkpoint(gated_checkpoint):
    return gated_checkpoint


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # direct: the replica's own HTTP port as well (--direct-port); every other test uses the proxy's
    with ServerProcess(checkpoint, "--batch-wait-ms", "2", "--max-batch-size", "16", log=log, direct=True) as s:
        yield s


@pytest.fixture(scope="module")
def model(checkpoint):
    return GatedModel.load(checkpoint)


def jpegs(image_dir):
    return sorted((image_dir / "train").glob("*/*.jpg"))


def test_predictions_equal_skipserve_eval(server, checkpoint, image_dir, capsys):
    from skipserve.cli import main

    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(image_dir), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    correct, units, flops = 0, [], []
    for path in jpegs(image_dir):
        r = httpx.post(server.url + "/v1/predict", content=path.read_bytes(),
                       headers={"content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        correct += body["label"] == path.parent.name
        units.append(body["units_executed"])
        flops.append(body["flops_ratio"])
        assert body["model"] == "tiny" and len(body["scores"]) == len(CLASSES)
        name, dur = r.headers["Server-Timing"].split(";")  # the replica's time, measured after latency_ms
        assert name == "app" and float(dur.removeprefix("dur=")) >= body["latency_ms"] > 0
    assert len(units) == expected["n_images"]
    assert correct / len(units) == expected["top1"]
    assert np.mean(units) == pytest.approx(expected["units_executed_mean"], abs=1e-9)
    assert np.mean(flops) == pytest.approx(expected["flops_ratio"], rel=1e-6)


def test_multipart_upload_and_top_k(server, image_dir):
    path = jpegs(image_dir)[0]
    r = httpx.post(server.url + "/v1/predict", params={"top_k": 2},
                   files={"file": ("x.jpg", path.read_bytes(), "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["scores"]) == 2 and body["scores"][0]["label"] == body["label"]
    assert body["scores"][0]["probability"] >= body["scores"][1]["probability"]


def test_tritonclient_v2_inference(server, model):
    tc = pytest.importorskip("tritonclient.http", reason="the standard v2 client under test")
    client = tc.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "units_executed"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy(), binary_data=False)
    outputs = [tc.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "units_executed")]
    result = client.infer("tiny", [inp], outputs=outputs)
    probs, units = result.as_numpy("probabilities"), result.as_numpy("units_executed")
    with torch.inference_mode():
        local = model(x)
    assert probs.shape == (3, len(CLASSES)) and units.shape == (3,)
    np.testing.assert_allclose(probs, torch.softmax(local.logits, 1).numpy(), atol=1e-4)
    np.testing.assert_array_equal(units, local.units_executed.numpy())


def test_budget_one_returns_the_full_models_outputs(server, model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.flatten().tolist()}],
            "parameters": {"budget": 1.0}}
    r = httpx.post(server.url + "/v2/models/tiny/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    with torch.inference_mode():
        full = torch.softmax(model.backbone(x), 1)
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(2, -1), full.numpy(), atol=1e-4)
    assert out["units_executed"]["data"] == [model.num_units] * 2


def test_uint8_and_bytes_tensors(server, image_dir):
    data = jpegs(image_dir)[0].read_bytes()
    pixels = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    for spec in ({"name": "input", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": pixels.flatten().tolist()},
                 {"name": "input", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}):
        r = httpx.post(server.url + "/v2/models/tiny/infer", json={"inputs": [spec]}, timeout=60)
        assert r.status_code == 200, (spec["datatype"], r.text)
        assert r.json()["outputs"][0]["shape"] == [1, len(CLASSES)]


def settled_metrics(url: str, period_s: float = 3.0) -> dict:
    """Metrics once two reads a report period apart agree (earlier tests' requests all reported)."""
    values = metric_values(url)
    for _ in range(20):
        time.sleep(period_s)
        again = metric_values(url)
        if again == values:
            return values
        values = again
    raise AssertionError("metrics did not settle")


def test_metrics_count_what_was_served(server, model, image_dir):
    before = settled_metrics(server.metrics_url)
    paths = jpegs(image_dir)[:5]
    units = 0
    for path in paths:
        r = httpx.post(server.url + "/v1/predict", content=path.read_bytes(), timeout=60)
        assert r.status_code == 200
        units += r.json()["units_executed"]
    deadline = time.monotonic() + 60  # Ray reports application metrics every couple of seconds
    while True:
        after = metric_values(server.metrics_url)
        images = total(after, "skipserve_images_total") - total(before, "skipserve_images_total")
        requests = (total(after, "skipserve_requests_total", route="/v1/predict", status="200")
                    - total(before, "skipserve_requests_total", route="/v1/predict", status="200"))
        if ((images, requests) == (5, 5) and total(after, "skipserve_units")) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (images, requests) == (5, 5)
    full = total(after, "skipserve_flops_full_total") - total(before, "skipserve_flops_full_total")
    assert full == pytest.approx(5 * model.flops.full, rel=1e-6)
    executed_units = total(after, "skipserve_unit_executed_total") - total(before, "skipserve_unit_executed_total")
    assert executed_units == units
    assert total(after, "skipserve_request_latency_seconds_count", route="/v1/predict") >= 5
    assert total(after, "skipserve_budget") == pytest.approx(0.5)
    assert total(after, "skipserve_units") == model.num_units
    from serving.metrics import series_names

    exported = {name for name, _ in after}
    assert exported <= series_names(), f"exported but undeclared: {exported - series_names()}"
    assert {"skipserve_requests_total", "skipserve_flops_full_total", "skipserve_batch_size_bucket"} <= exported


def test_monitor_reads_the_servers_savings(server, capsys):
    from skipserve.cli import main

    values = settled_metrics(server.metrics_url)
    saved = 1 - total(values, "skipserve_flops_executed_total") / total(values, "skipserve_flops_full_total")
    assert main(["monitor", "--metrics", server.metrics_url, "--window", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compute_saved"] == pytest.approx(saved, abs=1e-9)
    assert 0 < report["compute_saved"] < 1 and len(report["per_unit_skip_rate"]) == 9


def png_header(w, h):
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def v2(data=None, **over):
    spec = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": data or [0.0] * 3072}
    spec.update(over)
    return {"inputs": [spec]}


BAD = [
    ("empty body", "/v1/predict", {"content": b""}, 400),
    ("truncated JPEG", "/v1/predict", {"content": None}, 400),
    ("text", "/v1/predict", {"content": b"just some text", "headers": {"content-type": "text/plain"}}, 415),
    ("20000x20000 PNG header", "/v1/predict", {"content": png_header(20000, 20000)}, 413),
    ("negative budget", "/v1/predict?budget=-0.5", {"content": None}, 400),
    ("unknown policy", "/v1/predict?policy=fastest", {"content": None}, 400),
    ("wrong tensor shape", "/v2/models/tiny/infer", {"json": v2(shape=[1, 32, 32], data=[0.0] * 1024)}, 400),
    ("wrong dtype", "/v2/models/tiny/infer", {"json": v2(datatype="FP16")}, 400),
    ("NaN", "/v2/models/tiny/infer", {"content": json.dumps(v2([float("nan")] * 3072)).encode()}, 400),
    ("negative budget (v2)", "/v2/models/tiny/infer", {"json": {**v2(), "parameters": {"budget": -1}}}, 400),
    ("unknown model", "/v2/models/nope/infer", {"json": v2()}, 404),
    ("malformed JSON", "/v2/models/tiny/infer", {"content": b"{\"inputs\": [", "headers": {}}, 400),
    ("deeply nested JSON", "/v2/models/tiny/infer", {"content": b"[" * 100_000, "headers": {}}, 400),
    ("too many elements", "/v2/models/tiny/infer", {"json": v2(shape=[65, 3, 32, 32], data=[0.0])}, 413),
]


@pytest.mark.parametrize("what,route,kwargs,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(server, image_dir, what, route, kwargs, status):
    good = jpegs(image_dir)[0].read_bytes()
    kwargs = dict(kwargs)
    if "content" in kwargs and kwargs["content"] is None:
        kwargs["content"] = good[: len(good) // 3] if what == "truncated JPEG" else good
    r = httpx.post(server.url + route, timeout=60, **kwargs)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert isinstance(r.json().get("error"), str) and r.json()["error"], r.text
    if what not in ("negative budget", "unknown policy"):  # query validation answers before the handler
        assert r.headers["Server-Timing"].startswith("app;dur="), r.headers  # errors are timed too
    assert httpx.post(server.url + "/v1/predict", content=good, timeout=60).status_code == 200


def test_direct_port_answers_like_the_proxy_and_is_counted(server, image_dir):
    before = settled_metrics(server.metrics_url)
    paths = jpegs(image_dir)[:4]
    for path in paths:
        answers = [httpx.post(url + "/v1/predict", content=path.read_bytes(), timeout=60)
                   for url in (server.url, server.direct_url)]
        assert [a.status_code for a in answers] == [200, 200], answers[1].text
        proxy, direct = (a.json() for a in answers)
        assert direct["label"] == proxy["label"] and direct["units_executed"] == proxy["units_executed"]
        assert [s["probability"] for s in direct["scores"]] == pytest.approx(
            [s["probability"] for s in proxy["scores"]], abs=1e-6)
    bad = [httpx.post(url + "/v1/predict", content=b"not an image", headers={"content-type": "image/jpeg"},
                      timeout=60) for url in (server.url, server.direct_url)]
    assert bad[1].status_code == bad[0].status_code == 415  # same app, same JSON errors
    assert bad[1].json() == bad[0].json() and "error" in bad[1].json()
    deadline = time.monotonic() + 60
    while True:
        requests = (total(metric_values(server.metrics_url), "skipserve_requests_total", route="/v1/predict",
                          status="200") - total(before, "skipserve_requests_total", route="/v1/predict", status="200"))
        if requests == 2 * len(paths) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert requests == 2 * len(paths)  # both ways in are counted


def test_direct_port_refuses_what_it_cannot_serve(checkpoint, capsys):
    from skipserve.cli import main

    assert main(["serve", "--checkpoint", str(checkpoint), "--direct-port", "8001", "--replicas", "2"]) == 2
    assert "--direct-port needs one replica" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--direct-port", "8000", "--port", "8000"]) == 2
    assert "must differ from --port" in capsys.readouterr().err


def test_openapi_schema_is_served(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert {"/v1/predict", "/v2/models/{name}/infer", "/v2/health/ready"} <= set(schema["paths"])
    for route in ("/v2/models/nope", "/v2/models/nope/ready"):
        r = httpx.get(server.url + route, timeout=30)
        assert r.status_code == 404 and "nope" in r.json()["error"]


def test_prometheus_scrapes_the_server_and_monitor_shows_the_same_savings(server, image_dir, tmp_path, capsys):
    import shutil
    import subprocess

    import yaml

    from serving.process import free_port
    from skipserve.cli import main

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package 'prometheus'; .ci/run installs it)")
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [server.metrics_url.split("/")[2]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        for path in jpegs(image_dir)[:3]:
            assert httpx.post(server.url + "/v1/predict", content=path.read_bytes(), timeout=60).status_code == 200
        raw = settled_metrics(server.metrics_url)
        images = total(raw, "skipserve_images_total")
        saved = 1 - total(raw, "skipserve_flops_executed_total") / total(raw, "skipserve_flops_full_total")

        def query(q):
            r = httpx.get(base + "/api/v1/query", params={"query": q}, timeout=10).json()
            return r["data"]["result"] if r.get("status") == "success" else []

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                result = query("sum(skipserve_images_total)")
            except httpx.HTTPError:
                result = []
            if result and float(result[0]["value"][1]) == images:
                break
            time.sleep(1)
        else:
            pytest.fail(f"Prometheus never saw {images} images; log: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        assert not query("ray_skipserve_images_total"), "the scrape config renames Ray's prefixed series"
        assert query('sum by (unit) (skipserve_unit_executed_total)')
        assert main(["monitor", "--prometheus", base, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["images"] == images
        assert report["compute_saved"] == pytest.approx(saved, abs=1e-9)
    finally:
        prom.terminate()
        prom.wait(30)


def test_admission_counts_the_images_of_requests_still_being_read():
    """A replica refuses before reading a body when the requests it is already reading would fill
    its queue, so that refusing costs it nothing; an idle replica reads one request, however large."""
    from serving.app import GatedModelServer
    from serving.images import RequestError
    from serving.settings import AppArgs

    cls = GatedModelServer.func_or_class  # admission only: no model, no Ray
    replica = SimpleNamespace(settings=AppArgs(max_queued_images=64), _queued=16, _reading=0, autopilot=None)
    replica._admit, replica._reading_body = MethodType(cls._admit, replica), MethodType(cls._reading_body, replica)
    replica._would_shed = MethodType(cls._would_shed, replica)
    with replica._reading_body(16), replica._reading_body(16):
        with pytest.raises(RequestError, match="overloaded") as refused:
            with replica._reading_body(17):
                pass
        assert refused.value.status == 503
        with replica._reading_body(16):  # 16 queued + 3 x 16 being read = the limit
            assert replica._reading == 48
    assert replica._reading == 0
    replica._queued = 0
    with replica._reading_body(1000):  # a mean above the limit still lets an idle replica read
        assert replica._reading == 64


def test_reconfigure_checks_everything_before_applying_anything(gated_checkpoint):
    """A rejected user_config leaves the replica as it was: a half-applied one served every request
    with a knob the model could not decide by, or batches of 0. Errors name the field."""
    from serving.app import GatedModelServer
    from serving.engine import Engine
    from serving.settings import AppArgs

    cls = GatedModelServer.func_or_class  # the methods alone: no Ray
    applied = []
    replica = SimpleNamespace(settings=AppArgs(), engine=Engine(gated_checkpoint, threads=1), autopilot=None,
                              _export_gauges=lambda: None, _apply_batching=lambda b, w: applied.append((b, w)))
    replica._apply = MethodType(cls._apply, replica)
    reconfigure = MethodType(cls.reconfigure, replica)
    before, settings = replica.engine.default_policy, replica.settings
    for bad, message in (({"policy": "greedy", "knob": 1000}, "user_config policy/knob: greedy k=1000 exceeds"),
                         ({"policy": "fastest"}, "policy: unknown policy 'fastest'"),
                         ({"max_batch_size": 0}, "max_batch_size: Input should be greater than or equal to 1, "
                                                 "got 0"),
                         ({"knob": 0.3, "max_batch_size": -1}, "max_batch_size: Input should be greater"),
                         ({"knob": 0.3, "max_batch_size": True}, "max_batch_size: Input should be a valid integer"),
                         ({"knob": 0.3, "batch_wait_ms": -5}, "batch_wait_ms: Input should be greater"),
                         ({"knob": float("nan")}, "knob: Input should be a finite number"),
                         ({"knob": 0.3, "bogus": 1}, "invalid user_config: bogus: unknown field"),
                         ({"checkpoint": "other"}, "checkpoint: unknown field"),  # an app arg, not a live one
                         ([("knob", 0.3)], "invalid user_config: expected a mapping")):
        with pytest.raises(ValueError, match=message):
            reconfigure(bad)
        assert replica.engine.default_policy is before and applied == [] and replica.settings is settings, bad
    reconfigure({"policy": "threshold", "knob": 0.0, "max_batch_size": 8})
    assert replica.engine.default_policy.to_dict() == {"name": "threshold", "knob": 0.0}
    assert applied == [(8, AppArgs().batch_wait_ms)]
    assert (replica.settings.max_batch_size, replica.settings.policy) == (8, "threshold")
    reconfigure({"batch_wait_ms": 1})  # what a user_config leaves out keeps its value
    assert applied[-1] == (8, 1.0) and replica.engine.default_policy.to_dict()["name"] == "threshold"
    # the same fields as application args: a replica starts with them, checked against the model alike
    with pytest.raises(ValueError, match="application args policy/knob: greedy k=1000 exceeds"):
        replica._apply(AppArgs(policy="greedy", knob=1000), {"policy", "knob"}, "application args")
