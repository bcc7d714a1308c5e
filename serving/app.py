"""The Ray Serve application: one deployment that owns a gated model and speaks HTTP (FastAPI).

Routes (OpenAPI schema at /openapi.json, docs at /docs):
    POST /v1/predict                    one image (raw body or multipart file) -> label, scores, savings
    GET  /v2, /v2/health/live|ready     Open Inference Protocol (KServe v2) server endpoints
    GET  /v2/models/{name}[/ready]      model metadata and readiness
    POST /v2/models/{name}/infer        JSON tensors in, ``probabilities`` and ``units_executed`` out

``build_app(args)`` is the application builder of ``serve run deploy/serve_config.yaml``;
``skipserve serve`` binds the same deployment through ``bind_app``. Their settings are
``serving.settings.AppArgs``, and a deployment's ``user_config`` is ``LiveSettings``.
"""

import asyncio
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from enum import Enum
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from fastapi import FastAPI, Query, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from gating.policies import POLICIES
from gating.capcurve import CapCurve
from serving.autopilot import Autopilot
from serving.images import RequestError, declared_size, decode_image_bytes
from serving.model_process import ModelProcessError
from serving.settings import AppArgs, LiveSettings
from serving.v2 import DATATYPES, parse_infer_request

logger = logging.getLogger("ray.serve")

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
OUTPUTS = ("probabilities", "units_executed")


def _images_in(items: list) -> int:
    return sum(r.images.shape[0] for r in items)


api = FastAPI(title="skipserve", description="Gated residual networks that really skip units, over HTTP.",
              version="0.1.0")


class ErrorBody(BaseModel):
    error: str  # what was wrong, and where


_ERROR_MEANING = {400: "malformed request: the message says what and where", 404: "no such model",
                  413: "body or image over the server's limits", 415: "unsupported Content-Type",
                  503: "queue full, model process restarting, or shutting down; retry after the Retry-After "
                       "seconds"}


def _errors(*codes: int) -> dict:
    """OpenAPI ``responses`` for the JSON errors a route can return."""
    return {c: {"model": ErrorBody, "description": _ERROR_MEANING[c]} for c in codes}


PolicyName = Enum("PolicyName", {name: name for name in POLICIES.names()}, type=str)

_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}}}}}

_V2_TENSOR = {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": list(DATATYPES)}, "data": {"type": "array"},
    "parameters": {"type": "object"}}}
_V2_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _V2_TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string", "enum": list(OUTPUTS)}}}},
        "parameters": {"type": "object", "properties": {
            "budget": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "policy": {"type": "string", "enum": POLICIES.names()}, "alpha": {"type": "number"}}}}}}}}}


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: HTTPRequest, err: RequestError) -> JSONResponse:
    return _error(err.status, str(err))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: HTTPRequest, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return _error(400, f"invalid request: {problems}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail), err.headers)  # 405 keeps its Allow header


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("invalid Content-Length header")
        if int(declared) > limit:
            raise RequestError(f"body of {declared} bytes exceeds the limit of {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def image_from_request(request: HTTPRequest, body: bytes) -> bytes:
    """The encoded image of a /v1/predict request: the raw body, or the one file of a multipart form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await HTTPRequest(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as err:  # the multipart parser's errors are all "malformed form"
            raise RequestError(f"malformed multipart form: {err}") from None
        files = [v for v in form.values() if hasattr(v, "read")]
        if len(files) != 1:
            raise RequestError("multipart form must carry exactly one image file")
        return await files[0].read()
    if ctype and ctype not in IMAGE_TYPES:
        raise RequestError(f"unsupported Content-Type {ctype!r}; send {', '.join(IMAGE_TYPES)} "
                           "or multipart/form-data", status=415)
    return body


# Defined before the deployment class: Ray serialises the class, with the globals it sees, when it
# is decorated.
def _requested_outputs(payload: dict) -> list[str]:
    outputs = payload.get("outputs")
    if outputs is None:
        return list(OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    names = [o["name"] for o in outputs]
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown:
        raise RequestError(f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    return names


def _replica_cpus() -> int:
    """CPUs Ray reserved for this replica (its ``num_cpus``), at least 1."""
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # outside a Ray worker
        cpus = 1
    return max(1, int(cpus))


@serve.deployment(name="GatedModelServer", max_ongoing_requests=256, max_queued_requests=512,
                  health_check_period_s=5)
@serve.ingress(api)
class GatedModelServer:
    def __init__(self, args: AppArgs):
        from gating.zoo import resolve_checkpoint
        from serving.engine import Engine
        from serving.metrics import ServeMetrics
        from serving.model_process import ProcessEngine

        self.settings = AppArgs.parse(args)  # bind_app passes it validated; a mapping (a direct bind) is checked here
        threads = self.settings.threads or _replica_cpus()
        path = resolve_checkpoint(self.settings.checkpoint)
        self.engine = (ProcessEngine if self.settings.model_process else Engine)(path, threads=threads)
        self.name = self.settings.model_name
        self.metrics = ServeMetrics(self.name, self.engine.num_units)
        # one thread per batch in flight when the model has its own process; one model thread otherwise
        self._pool = ThreadPoolExecutor(max_workers=2 if self.settings.model_process else 1,
                                        thread_name_prefix="skipserve-model")
        self._queued = 0  # images accepted and not yet answered
        self._reading = 0  # images expected in the requests whose bodies are still being read
        self._images_per_v2_request = 1.0  # running mean: what a v2 request still being read counts as
        self.autopilot: Optional[Autopilot] = None
        self._curve = self._cap_curve()
        self._busy_mark = (time.perf_counter(), 0.0)  # (wall, engine.compute_s) at the last autopilot step
        served = {name for name in ("policy", "knob") if getattr(self.settings, name) is not None}
        self._apply(self.settings, served, "application args")
        self.autopilot = self._make_autopilot()  # its baseline: the rule the args chose
        self._export_gauges()
        threading.Thread(target=self._control_loop, name="skipserve-autopilot", daemon=True).start()
        logger.info("skipserve: serving %s (%s) as %r, policy %s, %d units, %d torch threads", path,
                    self.engine.model.card.arch.get("name"), self.name, self.engine.default_policy,
                    self.engine.num_units, torch.get_num_threads())

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose model process died is restarted."""
        if not getattr(self.engine, "alive", True):
            raise RuntimeError("the model process exited")

    # ------------------------------------------------------------------ live knobs
    def reconfigure(self, user_config: Optional[Mapping[str, Any]]) -> None:
        """Ray Serve's hook for the deployment's ``user_config``: ``LiveSettings`` fields. A field it
        leaves out keeps its value. Everything is checked before anything is applied: a rejected
        config changes nothing."""
        live = LiveSettings.from_user_config(user_config)
        self._apply(live, live.model_fields_set, "user_config")

    def _apply(self, live: LiveSettings, names: set[str], source: str) -> None:
        """Serve the fields ``names`` of ``live``. The rule is checked against the model as a request's
        own policy is (a gate where the rule needs one, a knob the model can decide by)."""
        rule = None
        if names & {"policy", "knob"}:
            try:
                rule = self.engine.policy_for(policy=live.policy or self.engine.default_policy.name, alpha=live.knob)
            except RequestError as err:
                raise ValueError(f"{source} policy/knob: {err}") from None
        if rule is not None:
            self.engine.default_policy = rule
            if self.autopilot is not None:  # the new rule is the autopilot's new baseline
                self.autopilot = self._make_autopilot()
            self._export_gauges()
        self.settings = self.settings.model_copy(update={name: getattr(live, name) for name in names})
        self._apply_batching(self.settings.max_batch_size, self.settings.batch_wait_ms)

    def _make_autopilot(self) -> Optional[Autopilot]:
        if self.settings.slo_p99_ms <= 0:
            return None
        if self.engine.model.gate is None:
            raise ValueError("the SLO autopilot adjusts the compute budget, which needs a gated model")
        curve = self._curve
        if curve is None:
            logger.warning("skipserve: %s has no cap curve in its card; the autopilot will not lower its cap "
                           "(nothing says what accuracy that costs) and holds the SLO by admission alone", self.name)
        pilot = Autopilot.for_rule(self.engine.default_policy, self.settings.slo_p99_ms, self.settings.min_budget,
                                   curve=curve, max_accuracy_drop_pp=self.settings.max_accuracy_drop,
                                   max_admit=self.settings.max_queued_images)
        self.engine.default_policy = pilot.policy
        return pilot

    def _cap_curve(self) -> Optional[CapCurve]:
        try:
            return CapCurve.of_card(self.engine.model.card.info)
        except ValueError as err:
            logger.warning("skipserve: %s: ignoring its card's cap curve: %s", self.name, err)
            return None

    def _expected_top1(self, rule) -> Optional[float]:
        """Validation top-1 of what ``rule`` serves, from the cap curve: known for the served rule."""
        curve = self._curve
        if curve is None or rule.key != self.engine.default_policy.key:
            return None
        return curve.top1 if rule.cap is None else curve.top1_at(rule.cap)

    def _control_loop(self) -> None:
        """Every period: one autopilot decision (when on), and the gauges exported again."""
        period = self.autopilot.cfg.interval_s if self.autopilot else 5.0
        while True:
            time.sleep(period)
            pilot = self.autopilot  # reconfigure() may replace it meanwhile
            if pilot is not None:
                pilot.step(self._queued, self._model_busy_share())
                served = pilot.policy
                if served.key != self.engine.default_policy.key:
                    self.engine.default_policy = served
            self._export_gauges()

    def _apply_batching(self, max_batch_size: int, batch_wait_ms: float) -> None:
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    def _export_gauges(self) -> None:
        # both every period, not only when they change: a gauge set only once, at start, can be
        # missing from Ray's metrics export
        cap = self.engine.default_policy.cap
        self.metrics.budget.set(math.nan if cap is None else cap)
        expected = self._expected_top1(self.engine.default_policy)
        self.metrics.expected_top1.set(math.nan if expected is None else expected)
        self.metrics.admit_limit.set(self.autopilot.admit_limit if self.autopilot else self.settings.max_queued_images)
        self.metrics.units.set(self.engine.num_units)

    # ------------------------------------------------------------------ inference
    # Two batches in flight: with the model in its own process, the next batch is already waiting
    # there when the current one finishes (``ProcessEngine.run`` pipelines); in-process, the one
    # model thread runs them in turn.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_images_in, max_concurrent_batches=2)
    async def _infer(self, requests: list) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run_batch, requests)

    def _model_busy_share(self) -> float:
        """The share of wall time since the last call that the model spent computing batches (its own
        time, in its process: not the hand-off, nor the queue)."""
        now, compute = time.perf_counter(), self.engine.compute_s
        wall0, compute0 = self._busy_mark
        self._busy_mark = (now, compute)
        return min(1.0, (compute - compute0) / max(now - wall0, 1e-9))

    def _run_batch(self, requests: list) -> list:
        results = self.engine.run(requests)
        keep = torch.cat([r.keep for r in results])  # (images, units)
        flops = float(sum(r.flops.sum() for r in results))
        self.metrics.batch(keep.shape[0], keep.sum(0).tolist(), flops, self.engine.full_flops * keep.shape[0])
        return results

    async def infer(self, images: torch.Tensor, policy) -> Any:
        """Run (N, 3, H, W) images; large requests are split to fit the batcher, then rejoined."""
        from serving.engine import Request, Result

        n = images.shape[0]
        self._admit(n, shed=False)
        self._queued += n
        try:
            step = self.settings.max_batch_size
            parts = await asyncio.gather(*(self._infer(Request(images[i:i + step], policy))
                                           for i in range(0, n, step)))
        finally:
            self._queued -= n
        if self.autopilot is not None:
            self.autopilot.served(n)
        return Result(*(torch.cat([getattr(p, f) for p in parts]) for f in
                        ("probabilities", "units_executed", "keep", "flops")))

    def _admit(self, n: int = 1, *, shed: bool = True) -> None:
        """503 when ``n`` more images would overflow this replica's queue, counting those expected
        in the requests still being read; with ``shed``, also beyond the autopilot's admission limit
        (checked before a body is read: a request admitted then is not shed after its work began)."""
        in_flight = self._queued + self._reading
        if in_flight + n > self.settings.max_queued_images:
            raise RequestError(f"overloaded: {self._queued} images queued and about {self._reading} in "
                               f"requests being read in this replica (limit {self.settings.max_queued_images}); "
                               f"retry later", status=503)
        pilot = self.autopilot
        if shed and self._would_shed(n):
            raise RequestError(f"shedding load to hold the p99 SLO of {pilot.cfg.slo_p99_ms:g} ms: {in_flight} images "
                               f"in flight, {pilot.admit_limit} admitted at a time now; retry later", status=503)

    def _would_shed(self, n: int) -> bool:
        """Whether the autopilot's admission limit refuses ``n`` more images now (an idle replica never does)."""
        in_flight = self._queued + self._reading
        return self.autopilot is not None and in_flight > 0 and in_flight + n > self.autopilot.admit_limit

    async def _slot(self, n: int) -> None:
        """While the autopilot's admission would shed ``n`` more images, wait (nothing read yet) up to
        its ``admit_wait`` x the SLO for a request in flight to finish: a slot usually frees within
        that, and a client shed must wait a whole Retry-After second. Then admission decides."""
        pilot = self.autopilot
        if pilot is None:
            return
        deadline = time.perf_counter() + pilot.cfg.admit_wait * pilot.cfg.slo_p99_ms / 1e3
        while self._would_shed(n) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)

    @contextmanager
    def _reading_body(self, expected: int = 1) -> Iterator[None]:
        """Admit a request before its body is read, counting it as ``expected`` images, so that an
        overloaded replica spends nothing on requests it will refuse; ``infer`` admits it again with
        its real image count. Capped at the limit, so that an idle replica always reads one."""
        expected = min(expected, self.settings.max_queued_images)
        self._admit(expected)
        self._reading += expected
        try:
            yield
        finally:
            self._reading -= expected

    async def _decode(self, data: bytes) -> torch.Tensor:
        """Small images decode on the event loop (a thread hop costs more); large ones off it."""
        try:
            _, w, h = declared_size(data)
        except RequestError:
            w = h = 0  # decode_image_bytes raises the same error, with its status
        args = (data, self.settings.limits, self.engine.input_size)
        return decode_image_bytes(*args) if w * h <= 256 * 256 else await asyncio.to_thread(decode_image_bytes, *args)

    async def _timed(self, route: str, request: HTTPRequest, handler) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            response = await handler(t0)
        except RequestError as err:
            response = _error(err.status, str(err))
        except ModelProcessError:  # the replica fails its health check and Ray replaces it
            logger.exception("skipserve: %s: model process unavailable", route)
            response = _error(503, "the model process is being restarted; retry")
        except Exception:  # a bug, not the client's fault: logged, answered as JSON 500
            logger.exception("skipserve: %s failed", route)
            response = _error(500, "internal error")
        seconds = time.perf_counter() - t0
        # the replica's own time, so a client can tell it from the proxy's and the network's
        response.headers["Server-Timing"] = f"app;dur={seconds * 1000:.3f}"
        self.metrics.request(route, response.status_code, seconds)
        if self.autopilot is not None and response.status_code == 200:
            self.autopilot.observe(seconds)
        return response

    # ------------------------------------------------------------------ routes
    @api.post("/v1/predict", summary="Classify one image (raw body or multipart file)",
              responses=_errors(400, 413, 415, 503), openapi_extra=_IMAGE_BODY)
    async def predict(self, request: HTTPRequest,
                      top_k: int = Query(5, ge=1, description="how many classes to return"),
                      budget: Optional[float] = Query(None, gt=0, le=1, description="fraction of backbone "
                                                      "FLOPs, (0, 1]; not together with policy/alpha"),
                      policy: Optional[PolicyName] = Query(None, description="the rule, with alpha as its knob"),
                      alpha: Optional[float] = Query(None, description="the rule's knob")) -> JSONResponse:
        async def handle(t0: float) -> JSONResponse:
            rule = self.engine.policy_for(budget=budget, policy=policy and policy.value, alpha=alpha)
            await self._slot(1)
            with self._reading_body():
                body = await read_body(request, self.settings.limits.max_body_bytes)
                data = await image_from_request(request, body)
                pixels = await self._decode(data)
            out = await self.infer(self.engine.pixels_to_input(pixels[None]), rule)
            probs = out.probabilities[0]
            k = min(top_k, probs.numel())
            top = probs.topk(k)
            names = self.engine.class_names
            return JSONResponse({
                "label": names[int(top.indices[0])],
                "index": int(top.indices[0]),
                "scores": [{"label": names[int(i)], "index": int(i), "probability": float(p)}
                           for p, i in zip(top.values, top.indices)],
                "units_executed": int(out.units_executed[0]),
                "units_total": self.engine.num_units,
                "flops_ratio": float(out.flops[0]) / self.engine.full_flops,
                "policy": rule.to_dict(),
                "expected_top1": self._expected_top1(rule),
                "latency_ms": (time.perf_counter() - t0) * 1000,
                "model": self.name,
            })

        return await self._timed("/v1/predict", request, handle)

    @api.get("/v2", summary="Server metadata (Open Inference Protocol)")
    async def server_metadata(self) -> dict:
        return {"name": "skipserve", "version": api.version, "extensions": []}

    @api.get("/v2/health/live", summary="Liveness")
    async def live(self) -> dict:
        return {"live": True}

    @api.get("/v2/health/ready", summary="Readiness: the model is loaded")
    async def ready(self) -> dict:
        return {"ready": True}

    def _check_model(self, name: str) -> None:
        if name != self.name:
            raise RequestError(f"unknown model {name!r}; this server serves {self.name!r}", status=404)

    @api.get("/v2/models/{name}", summary="Model metadata", responses=_errors(404))
    async def model_metadata(self, name: str) -> JSONResponse:
        self._check_model(name)  # a 404 through the RequestError handler
        h, w = self.engine.input_size
        return JSONResponse({
            "name": self.name, "versions": ["1"], "platform": "pytorch_skipserve",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, h, w]},
                       {"name": "input", "datatype": "UINT8", "shape": [-1, h, w, 3]},
                       {"name": "input", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.engine.class_names)]},
                        {"name": "units_executed", "datatype": "INT32", "shape": [-1]}],
            "parameters": {"policy": self.engine.default_policy.to_dict(), "units": self.engine.num_units,
                           "classes": self.engine.class_names},
        })

    @api.get("/v2/models/{name}/ready", summary="Model readiness", responses=_errors(404))
    async def model_ready(self, name: str) -> JSONResponse:
        self._check_model(name)  # a 404 through the RequestError handler
        return JSONResponse({"name": self.name, "ready": True})

    @api.post("/v2/models/{name}/infer", summary="Inference with JSON tensors (Open Inference Protocol)",
              responses=_errors(400, 404, 413, 503), openapi_extra=_V2_BODY)
    async def v2_infer(self, name: str, request: HTTPRequest) -> JSONResponse:
        async def handle(t0: float) -> JSONResponse:
            self._check_model(name)
            expected = max(1, round(self._images_per_v2_request))
            await self._slot(expected)
            with self._reading_body(expected):
                body = await read_body(request, self.settings.limits.max_body_bytes)
                try:
                    payload = json.loads(body)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise RequestError(f"malformed JSON: {err}") from None
                except RecursionError:  # e.g. 100,000 nested '[': the parser's stack, not ours
                    raise RequestError("malformed JSON: nested too deeply") from None
                parsed = await asyncio.to_thread(parse_infer_request, payload, limits=self.settings.limits,
                                                 size=self.engine.input_size, mean=self.engine.mean,
                                                 std=self.engine.std)
            self._images_per_v2_request += 0.2 * (parsed.images.shape[0] - self._images_per_v2_request)
            wanted = _requested_outputs(payload)
            rule = self.engine.policy_for(budget=parsed.budget, policy=parsed.policy, alpha=parsed.alpha)
            out = await self.infer(parsed.images, rule)
            n, c = out.probabilities.shape
            tensors = {
                "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": [n, c],
                                  "data": out.probabilities.flatten().tolist()},
                "units_executed": {"name": "units_executed", "datatype": "INT32", "shape": [n],
                                   "data": out.units_executed.tolist()},
            }
            response = {"model_name": self.name, "model_version": "1",
                        "outputs": [tensors[o] for o in wanted],
                        "parameters": {"flops_ratio": float(out.flops.mean()) / self.engine.full_flops,
                                       "policy": json.dumps(rule.to_dict())}}
            expected = self._expected_top1(rule)
            if expected is not None:  # v2 parameters are scalars: absent when unknown
                response["parameters"]["expected_top1"] = expected
            if parsed.request_id is not None:
                response["id"] = parsed.request_id
            return JSONResponse(response)

        return await self._timed("/v2/models/infer", request, handle)


def bind_app(args: Union[AppArgs, Mapping[str, Any]], *, num_replicas: Optional[int] = None,
             num_cpus: Optional[float] = None) -> serve.Application:
    """The deployment bound to ``args``, with ``num_replicas`` replicas of ``num_cpus`` CPUs each
    (unset: the deployment's defaults, or the serve config's ``deployments`` section)."""
    settings = AppArgs.parse(args)  # a bad setting fails here, in the caller, before any replica starts
    options: dict[str, Any] = {}
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    if num_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": num_cpus}
    return GatedModelServer.options(**options).bind(settings)


def build_app(args: AppArgs) -> serve.Application:
    """Ray Serve's application builder (``import_path: serving.app:build_app``).

    Its one parameter is annotated with the Pydantic model, so Ray Serve validates the config's
    ``args`` into an ``AppArgs`` before calling it; a mapping, from a direct call, is validated here.
    """
    return bind_app(args)
