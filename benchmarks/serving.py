"""``skipserve bench serving``: closed-loop HTTP load against the gated deployment vs policy full,
and against the plain server a user would otherwise write.

One server is started (``skipserve serve`` in a child process, real Ray Serve) and both sides
are measured against it with the same batching: the gated side sends plain requests (the
model's own policy and knob), the full side the same requests with ``policy=full``. Phases
alternate (gated, full, gated, full, ...) so that machine drift hits both alike; each side's
figures pool its phases. Every client keeps one request in flight (closed loop), so the
offered load is the concurrency. With one image per request, a plain single-process FastAPI server
of the same checkpoint (``benchmarks.plain_server``: no Ray, no batching, a replica's torch threads)
is measured first, under the same load: the ``plain`` side.
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

from benchmarks.common import machine_info


@dataclass
class ServingBenchConfig:
    checkpoint: str = "default"  # shipped name or path
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"  # request images: the validation split, as JPEG
    concurrency: tuple[int, ...] = (16,)  # closed-loop clients; the last level is the headline
    phase_s: float = 15.0  # seconds per measured phase
    rounds: int = 2  # gated/full alternations per level
    warmup_s: float = 3.0  # unmeasured load before each level
    images: int = 256  # distinct request images, cycled
    images_per_request: int = 1  # > 1: Open Inference requests carrying that many JPEGs (BYTES) each
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    replicas: int = 1
    direct: bool = False  # send to the replica's own HTTP server (serve --direct-port), not through Ray's proxy
    log: str = ""  # server log file; "" = a temporary file


def request_images(cfg: ServingBenchConfig) -> list[bytes]:
    from torchvision.io import encode_jpeg

    from training.backbone import BackboneConfig, load_split

    _, val = load_split(BackboneConfig(data=cfg.data))
    return [encode_jpeg(val.images[i], quality=95).numpy().tobytes() for i in range(min(cfg.images, len(val)))]


async def closed_loop(url: str, images: list[bytes], concurrency: int, seconds: float,
                      params: dict, caps: bool = False, content_type: str = "image/jpeg",
                      retry_after: bool = False) -> dict:
    """``concurrency`` clients, each one request in flight, for ``seconds``; with ``caps``, also
    the compute cap of every answer as (seconds into the run, cap or None). With ``retry_after`` a
    client answered 503 waits as its Retry-After header asks (a well-behaved client), else it
    sends its next request at once."""
    import json

    import aiohttp

    latencies: list[float] = []
    served: list[tuple[float, float | None]] = []
    statuses: dict[int, int] = {}
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=images[i % len(images)], params=params,
                                        headers={"content-type": content_type}) as r:
                    body = await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        now = time.perf_counter()
                        latencies.append(now - t0)
                        if caps:
                            served.append((now - start, served_cap(json.loads(body))))
                    else:
                        errors += 1
                        wait = r.headers.get("Retry-After", "") if retry_after and r.status == 503 else ""
                        if wait.isdigit():
                            await asyncio.sleep(min(float(wait), max(0.0, stop_at - time.perf_counter())))
            except aiohttp.ClientError:
                errors += 1
            i += concurrency

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(client(k, s) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "seconds": elapsed, "statuses": statuses, "caps": served}


def served_cap(answer: dict) -> float | None:
    """The compute cap (budget) an answer was served under, None for an uncapped rule: /v1/predict
    names its policy, a v2 answer in its parameters."""
    import json

    from gating.policies import make_policy

    policy = answer["policy"] if "policy" in answer else json.loads(answer["parameters"]["policy"])
    if "cap" in policy:
        return policy["cap"]
    return make_policy(policy["name"], policy["knob"]).cap


def v2_body(images: list[bytes], n: int, start: int, policy: str | None) -> bytes:
    """An Open Inference request carrying ``n`` of the JPEGs (BYTES, base64) from ``start``."""
    import base64
    import json

    data = [base64.b64encode(images[(start + j) % len(images)]).decode() for j in range(n)]
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [n], "data": data}],
            "outputs": [{"name": "units_executed"}]}
    if policy is not None:
        body["parameters"] = {"policy": policy}
    return json.dumps(body).encode()


def summarise(phases: list[dict]) -> dict:
    lat = sorted(x for p in phases for x in p["latencies"])
    seconds = sum(p["seconds"] for p in phases)
    # one request is every quantile; none gives NaN (null in JSON)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 else (lat or [float("nan")]) * 99
    return {"throughput_rps": len(lat) / seconds if seconds > 0 else 0.0, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
            "requests": len(lat) + sum(p["errors"] for p in phases), "errors": sum(p["errors"] for p in phases),
            "phase_rps": [round(len(p["latencies"]) / p["seconds"], 2) for p in phases]}


def plain_server(checkpoint, threads: int, log: str):
    """The plain single-process FastAPI server (``benchmarks.plain_server``) as a child process."""
    import sys

    from serving.process import ServerProcess

    server = ServerProcess(checkpoint, log=log)
    server.cmd = [sys.executable, "-m", "benchmarks.plain_server", "--checkpoint", str(checkpoint),
                  "--port", str(server.port), "--threads", str(threads)]
    return server


def run(cfg: ServingBenchConfig) -> dict:
    import os

    from gating.zoo import resolve_checkpoint
    from serving.launch import replica_cpus, replica_threads
    from serving.settings import model_name_for
    from serving.process import ServerProcess

    path = resolve_checkpoint(cfg.checkpoint)
    images = request_images(cfg)
    log = cfg.log or tempfile.mktemp(prefix="skipserve-bench-serving-", suffix=".log")
    args = ["--max-batch-size", str(cfg.max_batch_size), "--batch-wait-ms", str(cfg.batch_wait_ms),
            "--replicas", str(cfg.replicas)]
    plain: dict[int, dict] = {}
    if cfg.images_per_request == 1:  # the plain server's side first, on a machine with nothing else running
        with plain_server(path, replica_threads(replica_cpus(os.cpu_count() or 1, cfg.replicas)), log + ".plain") as server:
            url = server.url + "/v1/predict"
            for c in cfg.concurrency:
                asyncio.run(closed_loop(url, images, c, cfg.warmup_s, {}))
                plain[c] = summarise([asyncio.run(closed_loop(url, images, c, cfg.phase_s, {}))
                                      for _ in range(cfg.rounds)])
    levels = []
    with ServerProcess(path, *args, log=log, direct=cfg.direct) as server:
        base = server.direct_url if cfg.direct else server.url
        if cfg.images_per_request > 1:  # v2 bodies; the full side's ask for policy full
            url, ctype = base + f"/v2/models/{model_name_for(cfg.checkpoint)}/infer", "application/json"
            sides = {side: [v2_body(images, cfg.images_per_request, k, policy) for k in range(len(images))]
                     for side, policy in (("gated", None), ("full", "full"))}
            params = {"gated": {}, "full": {}}
        else:
            url, ctype = base + "/v1/predict", "image/jpeg"
            sides = {"gated": images, "full": images}
            params = {"gated": {}, "full": {"policy": "full"}}
        for c in cfg.concurrency:
            for side, bodies in sides.items():
                asyncio.run(closed_loop(url, bodies, c, cfg.warmup_s, params[side], content_type=ctype))
            phases: dict[str, list[dict]] = {k: [] for k in sides}
            for _ in range(cfg.rounds):
                for side, bodies in sides.items():
                    phases[side].append(asyncio.run(closed_loop(url, bodies, c, cfg.phase_s, params[side],
                                                                content_type=ctype)))
            level = {side: summarise(p) for side, p in phases.items()}
            level["plain"] = plain.get(c)
            if level["plain"] and level["plain"]["throughput_rps"]:
                level["gated_vs_plain"] = level["gated"]["throughput_rps"] / level["plain"]["throughput_rps"]
            level["concurrency"] = c
            full_rps = level["full"]["throughput_rps"]  # 0 when every request failed: no ratio (NaN, null in JSON)
            level["throughput_ratio"] = level["gated"]["throughput_rps"] / full_rps if full_rps else float("nan")
            levels.append(level)
    head = levels[-1]
    return {"benchmark": "serving", "checkpoint": cfg.checkpoint, "gated": head["gated"], "full": head["full"],
            "plain": head["plain"], "gated_vs_plain": head.get("gated_vs_plain"),
            "throughput_ratio": head["throughput_ratio"], "concurrency": head["concurrency"], "levels": levels,
            "config": asdict(cfg), "server_log": str(log), "machine": machine_info()}
