"""Deployment manifests: they parse with the tools' own schemas and name only metrics the server exports."""
import json
import re
from pathlib import Path

import pytest
import yaml

from serving.metrics import NAMES, series_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())


def test_serve_config_parses_with_ray_serves_schema_and_builds_the_app():
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve's own config schema")
    config = serve_config()
    parsed = schema.ServeDeploySchema.model_validate(config) if hasattr(schema.ServeDeploySchema, "model_validate") \
        else schema.ServeDeploySchema.parse_obj(config)
    app = parsed.applications[0]
    assert app.import_path == "serving.app:build_app"
    assert config["http_options"]["host"] == "127.0.0.1", "bind loopback unless told otherwise"

    from serving.app import GatedModelServer, build_app

    assert [d["name"] for d in config["applications"][0]["deployments"]] == [GatedModelServer.name]
    assert build_app(app.args) is not None  # the args are fields the builder knows


def test_ray_serve_validates_the_configs_args_into_the_builders_model():
    """``serve run``/``serve deploy`` call the builder through Ray's own helper, which validates the
    config's ``args`` into the model the builder's parameter is annotated with."""
    pytest.importorskip("ray.serve", reason="Ray Serve's application builder call")
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call_builder

    from serving.app import build_app
    from serving.settings import AppArgs

    args = serve_config()["applications"][0]["args"]
    app = call_builder(build_app, args)
    (settings,) = app._bound_deployment.init_args
    assert isinstance(settings, AppArgs) and settings.max_queued_images == args["max_queued_images"]
    assert settings.limits.max_pixels == args["max_pixels"]
    for bad, field in (({**args, "max_batch_size": 0}, "max_batch_size"), ({**args, "max_batch": 3}, "max_batch"),
                       ({**args, "max_pixels": -1}, "max_pixels")):
        with pytest.raises(ValidationError, match=field):
            call_builder(build_app, bad)


@pytest.mark.parametrize("args,message", [
    ({"checkpoint": "default", "max_batch": 3}, "invalid application args: max_batch: unknown field"),
    ({"max_batch_size": 0}, "max_batch_size: Input should be greater than or equal to 1, got 0"),
    ({"batch_wait_ms": "soon"}, "batch_wait_ms: Input should be a valid number"),
    ({"min_budget": 1.5}, "min_budget: Input should be less than or equal to 1"),
    ({"policy": "fastest"}, "policy: unknown policy 'fastest'"),
    ({"max_body_bytes": 0}, "max_body_bytes: Input should be greater than or equal to 1"),
])
def test_bad_app_args_fail_in_the_builder_naming_the_field(args, message):
    pytest.importorskip("ray.serve", reason="the builder binds a Ray Serve deployment")
    from serving.app import build_app

    with pytest.raises(ValueError, match=message):
        build_app(args)


def test_the_settings_model_documents_every_field_and_the_live_ones_are_app_args():
    from serving.settings import AppArgs, LiveSettings

    undocumented = [name for name, f in AppArgs.model_fields.items() if not f.description]
    assert not undocumented, f"fields without a description: {undocumented}"
    assert set(LiveSettings.model_fields) < set(AppArgs.model_fields)
    assert set(AppArgs.model_json_schema()["properties"]) == set(AppArgs.model_fields)
    app = serve_config()["applications"][0]
    AppArgs.parse(app["args"])
    LiveSettings.from_user_config(app["deployments"][0]["user_config"])
    assert AppArgs.parse({"checkpoint": "runs/x/model.safetensors"}).model_name == "model"
    assert AppArgs.parse({"max_batch_size": "8"}).max_batch_size == 8  # args convert, as command-line values do
    with pytest.raises(ValueError, match="max_batch_size: Input should be a valid integer"):
        LiveSettings.from_user_config({"max_batch_size": "8"})  # a user_config is typed: no conversion


def test_rayservice_embeds_the_serve_config():
    rs = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert rs["kind"] == "RayService" and rs["apiVersion"].startswith("ray.io/")
    embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
    expected = serve_config()
    expected["http_options"]["host"] = "0.0.0.0"
    assert embedded == expected
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] and cluster["workerGroupSpecs"][0]["maxReplicas"] > 1
    assert "autoscaling_config" in embedded["applications"][0]["deployments"][0]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def dashboard_metrics() -> set[str]:
    dash = json.loads((DEPLOY / "grafana" / "skipserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"\bskipserve_[a-z0-9_]+", e)}


def test_dashboard_queries_only_exported_metrics():
    used = dashboard_metrics()
    assert used, "the dashboard queries no skipserve metric"
    unknown = used - series_names()
    assert not unknown, f"dashboard queries metrics the server does not export: {sorted(unknown)}"
    for needed in ("skipserve_requests_total", "skipserve_request_latency_seconds_bucket",
                   "skipserve_flops_executed_total", "skipserve_flops_full_total", "skipserve_unit_executed_total",
                   "skipserve_batch_size_bucket"):
        assert needed in used, f"the dashboard shows no {needed}"


def test_dashboard_check_catches_a_misspelt_metric():
    assert "skipserve_request_total" not in series_names() and "skipserve_requests_total" in series_names()
    assert all(any(s.startswith(name) for s in series_names()) for name in NAMES)


def test_prometheus_config_renames_ray_prefixed_series():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    rule = job["metric_relabel_configs"][0]
    pattern = re.compile(f"^(?:{rule['regex']})$")  # Prometheus anchors relabel regexes
    for name in series_names():
        match = pattern.match("ray_" + name)
        assert match and match.expand(rule["replacement"].replace("$1", r"\1")) == name
    assert not pattern.match("ray_serve_num_http_requests_total"), "Ray's own series keep their names"
    assert job["static_configs"][0]["targets"][0].startswith("127.0.0.1:")
