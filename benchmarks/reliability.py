"""``skipserve bench reliability``: bad input, overload and a killed replica against a real server.

Phases, one server:
1. bad input: every malformed image of ``malformed_corpus`` and every malformed v2 body, repeated;
   each must get a JSON 4xx (a 5xx is counted in ``bad_input_5xx``); then schemathesis fuzzes every
   route of the server's own /openapi.json with all its checks (no 5xx, documented status codes and
   bodies, 405s with Allow), less one: positive_data_acceptance, because an image upload's schema is
   "any bytes" and a tensor's shape/data agreement and the size limits are rules JSON Schema cannot state;
2. good input: images whose answers are known from the same model run locally; a different
   label or path is a ``wrong_answer``;
3. overload: far more concurrent multi-image requests than the replica queues; rejected ones
   must be 503 and fast, accepted ones right, and the replicas' resident memory is sampled
   before, during and after each of two storms (``memory_mb``: bounded means the second storm
   leaves it where the first did);
4. faults: the replica's model process is killed (SIGKILL): answers are 503 until the replica's
   health check fails and Ray replaces it (``model_process_recovery_s``, until a correct answer
   from a new model process); then the replica process itself is killed and Ray starts another
   (``restart_recovery_s``).
``server_crashes`` counts the times the server process itself died.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from benchmarks.common import machine_info


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(w: int, h: int, bit_depth: int = 8, color: int = 2, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + (_png_chunk(b"IDAT", idat) if idat else b"") \
        + _png_chunk(b"IEND", b"")


def malformed_corpus(good_jpeg: bytes) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, decodable): images a server meets in the wild. ``decodable`` ones must be
    answered (200), the others refused with a JSON 4xx; none may cause a 5xx."""
    import numpy as np
    from PIL import Image

    def pil(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgb = Image.new("RGB", (40, 30), (200, 30, 60))
    bomb = zlib.compress(b"\x00" * ((3 * 6000 + 1) * 6000), 9)  # 6000x6000 of zeros, ~100 KB compressed
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    anim = io.BytesIO()
    frames[0].save(anim, format="WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return [
        ("empty", b"", False),
        ("truncated jpeg (header only)", good_jpeg[:30], False),
        ("truncated jpeg (half)", good_jpeg[: len(good_jpeg) // 2], False),
        ("wrong magic", b"\x00\x01\x02\x03" + good_jpeg[4:], False),
        ("text", b"definitely not an image\n" * 4, False),
        ("html", b"<html><body>hi</body></html>", False),
        ("png declaring 20000x20000", png_declaring(20000, 20000), False),
        ("png declaring 0x0", png_declaring(0, 0), False),
        ("png decompression bomb 6000x6000", png_declaring(6000, 6000, idat=bomb), False),
        ("png with corrupt data", png_declaring(32, 32, idat=b"\x78\x9c" + os.urandom(64)), False),
        ("gif", pil(rgb, "GIF"), False),
        ("bmp", pil(rgb, "BMP"), False),
        ("cmyk jpeg", pil(rgb.convert("CMYK"), "JPEG"), True),
        ("grayscale png", pil(rgb.convert("L"), "PNG"), True),
        ("16-bit png", pil(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"), True),
        ("rgba png", pil(rgb.convert("RGBA"), "PNG"), True),
        ("palette png", pil(rgb.convert("P"), "PNG"), True),
        ("animated webp", anim.getvalue(), True),
        ("webp", pil(rgb, "WEBP"), True),
        ("large jpeg 2048x1536", pil(Image.new("RGB", (2048, 1536), (10, 120, 200)), "JPEG"), True),
    ]


def malformed_v2(model: str) -> list[tuple[str, str, bytes]]:
    """(name, route, body) of Open Inference requests that must each get a JSON 4xx."""
    good = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}

    def body(**over):
        return json.dumps({"inputs": [{**good, **over}]}).encode()

    route = f"/v2/models/{model}/infer"
    return [
        ("not json", route, b"{\"inputs\": ["),
        ("json array", route, b"[1, 2, 3]"),
        ("no inputs", route, b"{}"),
        ("two inputs", route, json.dumps({"inputs": [good, good]}).encode()),
        ("shape not a list", route, body(shape="1,3,32,32")),
        ("negative dim", route, body(shape=[-1, 3, 32, 32])),
        ("data too short", route, body(data=[0.0] * 10)),
        ("strings as FP32", route, body(data=["x"] * 3072)),
        ("NaN", route, json.dumps({"inputs": [{**good, "data": [float("nan")] * 3072}]}).encode()),
        ("unknown dtype", route, body(datatype="FP64")),
        ("UINT8 out of range", route, body(datatype="UINT8", shape=[1, 32, 32, 3], data=[300] * 3072)),
        ("bad base64", route, body(datatype="BYTES", shape=[1], data=["%%%"])),
        ("bytes not an image", route, body(datatype="BYTES", shape=[1], data=[base64.b64encode(b"hi").decode()])),
        ("too many images", route, body(shape=[65, 3, 32, 32], data=[0.0])),
        ("budget zero", route, json.dumps({"inputs": [good], "parameters": {"budget": 0}}).encode()),
        ("budget and alpha", route, json.dumps({"inputs": [good], "parameters": {"budget": 0.5, "alpha": 1}}).encode()),
        ("unknown model", "/v2/models/no-such-model/infer", body()),
        ("unknown output", route, json.dumps({"inputs": [good], "outputs": [{"name": "logits"}]}).encode()),
    ]


@dataclass
class ReliabilityBenchConfig:
    checkpoint: str = "default"
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"
    bad_repeats: int = 5  # passes over the malformed corpus
    good_images: int = 200  # requests with known answers
    overload_concurrency: int = 64
    overload_images: int = 16  # images per overload request
    overload_s: float = 10.0
    schemathesis_examples: int = 25  # examples per route and phase; 0 skips the schemathesis phase
    kill: bool = True
    recovery_timeout_s: float = 180.0


def replica_pids(server_pid: int, marker: str = "ServeReplica") -> list[int]:
    """PIDs of the Serve replica processes started under a ``skipserve serve`` process (with
    ``marker="serving.model_process"``: their model processes)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        pid, ppid, *args = line.strip().split(None, 2)
        children.setdefault(int(ppid), []).append((int(pid), args[0] if args else ""))
    found, todo = [], [server_pid]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            todo.append(pid)
            if marker in args:
                found.append(pid)
    return found


def replica_rss_mb(server_pid: int) -> float:
    """Resident memory of the server's replica processes together, in MiB (one gone meanwhile counts 0)."""
    total = 0
    for pid in replica_pids(server_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1024


class MemorySampler(threading.Thread):
    """Samples the replicas' RSS every ``period`` s until stopped; ``peak`` is the largest sample."""

    def __init__(self, server_pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.server_pid, self.period, self.peak = server_pid, period, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, replica_rss_mb(self.server_pid))
            self._stop_event.wait(self.period)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak


def run_schemathesis(base: str, model: str, examples: int, seed: int = 1) -> dict:
    """Fuzz the live server from its own OpenAPI schema with the schemathesis CLI."""
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists():
        return {"skipped": "schemathesis is not installed (pip install -e '.[dev]')"}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "schemathesis.toml"
        config.write_text(f'[parameters]\n"path.name" = "{model}"\n')  # the served model, not random names
        t0 = time.perf_counter()
        proc = subprocess.run([str(cli), "--config-file", str(config), "run", base + "/openapi.json",
                               "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                               "--max-examples", str(examples), "--seed", str(seed), "--request-timeout", "30",
                               "--no-color"], capture_output=True, text=True, cwd=tmp)
    out = proc.stdout + proc.stderr
    cases = [line.strip() for line in out.splitlines() if " generated" in line]
    failures = [line.strip() for line in out.splitlines() if line.strip().startswith("- ST")]
    return {"exit_code": proc.returncode, "test_cases": cases[-1] if cases else None, "failures": failures,
            "seconds": time.perf_counter() - t0, "output_tail": out[-3000:] if proc.returncode else ""}


def run(cfg: ReliabilityBenchConfig) -> dict:
    import httpx
    import torch
    from torchvision.io import encode_jpeg

    from gating.zoo import resolve_checkpoint
    from serving.settings import model_name_for
    from serving.engine import Engine, Request
    from serving.images import Limits, decode_image_bytes
    from serving.process import ServerProcess
    from training.backbone import BackboneConfig, load_split

    path = resolve_checkpoint(cfg.checkpoint)
    engine = Engine(path)  # the replica's own inference path, run locally for the expected answers
    name = model_name_for(cfg.checkpoint)
    _, val = load_split(BackboneConfig(data=cfg.data))
    jpegs = [encode_jpeg(val.images[i], quality=100).numpy().tobytes() for i in range(min(cfg.good_images, len(val)))]
    seen = torch.stack([decode_image_bytes(j, Limits(), engine.input_size) for j in jpegs])  # what the server sees
    [out] = engine.run([Request(engine.pixels_to_input(seen), engine.default_policy)])
    expected = [(int(i), int(u)) for i, u in zip(out.probabilities.argmax(1), out.units_executed)]
    status: Counter = Counter()
    result = {"requests": 0, "bad_input_5xx": 0, "wrong_answers": 0, "server_crashes": 0, "restarts": 0,
              "restart_recovery_s": None, "overload": {}, "failures": []}
    log = tempfile.mktemp(prefix="skipserve-bench-reliability-", suffix=".log")

    def check(r: httpx.Response, what: str, ok: bool | None) -> None:
        result["requests"] += 1
        status[r.status_code] += 1
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 500 and ok is not None:
            result["bad_input_5xx"] += 1
            result["failures"].append(f"{what}: {r.status_code} {r.text[:200]}")
        elif ok is False and not (400 <= r.status_code < 500 and isinstance(body, dict) and body.get("error")):
            result["failures"].append(f"{what}: expected a JSON 4xx, got {r.status_code} {r.text[:200]}")
        elif ok is True and r.status_code != 200:
            result["failures"].append(f"{what}: expected 200, got {r.status_code} {r.text[:200]}")

    def good_round(client: httpx.Client, base: str) -> int:
        wrong = 0
        for j, (data, (label, units)) in enumerate(zip(jpegs, expected)):
            r = client.post(base + "/v1/predict", content=data, headers={"content-type": "image/jpeg"})
            check(r, f"good image {j}", None)
            if r.status_code == 200 and (r.json()["index"], r.json()["units_executed"]) != (label, units):
                wrong += 1
        return wrong

    with ServerProcess(path, log=log) as server, httpx.Client(timeout=60) as client:
        base = server.url
        corpus = malformed_corpus(jpegs[0])
        for _ in range(cfg.bad_repeats):
            for what, data, decodable in corpus:
                check(client.post(base + "/v1/predict", content=data), what, decodable)
            for what, route, body in malformed_v2(name):
                check(client.post(base + route, content=body, headers={"content-type": "application/json"}),
                      what, False)
        if cfg.schemathesis_examples:
            result["schemathesis"] = fuzz = run_schemathesis(base, name, cfg.schemathesis_examples)
            if fuzz.get("exit_code"):
                result["failures"].append(f"schemathesis: exit {fuzz['exit_code']}: {fuzz['failures']}")
        result["wrong_answers"] += good_round(client, base)

        # overload: v2 requests of several images each, far past the replica's queue
        x = torch.zeros(cfg.overload_images, 3, 32, 32)
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.flatten().tolist()}]}).encode()
        # two storms: memory after the second must sit where the first left it (bounded, not leaking)
        memory = {"before": replica_rss_mb(server.proc.pid), "peak": 0.0, "after": []}
        for _ in range(2):
            sampler = MemorySampler(server.proc.pid)
            sampler.start()
            storm = asyncio.run(_overload(base + f"/v2/models/{name}/infer", body, cfg))
            memory["peak"] = max(memory["peak"], sampler.stop())
            time.sleep(1.0)
            memory["after"].append(replica_rss_mb(server.proc.pid))
            status.update({int(k): v for k, v in storm["status_counts"].items()})
            result["requests"] += sum(storm["status_counts"].values())
            result["overload"] = storm  # the second storm's figures
            result["wrong_answers"] += good_round(client, base)  # recovered after the storm, answers still right
        result["memory_mb"] = {"before": round(memory["before"], 1), "peak": round(memory["peak"], 1),
                               "after_storm_1": round(memory["after"][0], 1),
                               "after_storm_2": round(memory["after"][1], 1)}

        if cfg.kill:
            def kill(marker: str) -> tuple[int, Optional[float]]:
                return kill_and_time_recovery(client, base + "/v1/predict", jpegs[0], server.proc.pid, marker,
                                              cfg.recovery_timeout_s, status, result)

            _, result["model_process_recovery_s"] = kill("serving.model_process")
            result["wrong_answers"] += good_round(client, base)
            result["restarts"], result["restart_recovery_s"] = kill("ServeReplica")
            result["wrong_answers"] += good_round(client, base)
        result["server_crashes"] = int(server.proc.poll() is not None)
    result["status_counts"] = {str(k): v for k, v in sorted(status.items())}
    result.update(benchmark="reliability", checkpoint=cfg.checkpoint, config=asdict(cfg), server_log=log,
                  machine=machine_info())
    return result


def kill_and_time_recovery(client, url: str, jpeg: bytes, server_pid: int, marker: str, timeout_s: float,
                           status: Counter, result: dict) -> tuple[int, Optional[float]]:
    """SIGKILL every process under the server whose command line holds ``marker``; returns how many,
    and the seconds until a new one is there and the server answers an image with 200 (None: not
    within ``timeout_s``). Every request sent meanwhile is counted in ``status`` and ``result``."""
    import httpx

    victims = set(replica_pids(server_pid, marker))
    t_kill = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    while victims and time.monotonic() - t_kill < timeout_s:
        try:
            r = client.post(url, content=jpeg, headers={"content-type": "image/jpeg"}, timeout=10)
            result["requests"] += 1
            status[r.status_code] += 1
            if r.status_code == 200 and set(replica_pids(server_pid, marker)) - victims:
                return len(victims), time.monotonic() - t_kill
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return len(victims), None


async def _overload(url: str, body: bytes, cfg: ReliabilityBenchConfig) -> dict:
    import aiohttp

    statuses: Counter = Counter()
    # status -> (client's ms, replica's own ms from Server-Timing); the client's adds the proxy's,
    # which on a small machine shares its cores with the client, the replica and the model
    times: dict[int, tuple[list[float], list[float]]] = {200: ([], []), 503: ([], [])}
    stop_at = time.perf_counter() + cfg.overload_s

    async def client(session):
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                statuses[r.status] += 1
                if r.status in times:
                    client_ms, server_ms = times[r.status]
                    client_ms.append((time.perf_counter() - t0) * 1e3)
                    server = _server_timing_ms(r.headers.get("Server-Timing", ""))
                    if server is not None:
                        server_ms.append(server)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=cfg.overload_concurrency)) as s:
        await asyncio.gather(*(client(s) for _ in range(cfg.overload_concurrency)))

    def quantile(values: list[float], q: float) -> Optional[float]:
        return sorted(values)[int(q * (len(values) - 1))] if values else None

    (served_ms, served_server_ms), (rejected_ms, rejected_server_ms) = times[200], times[503]
    return {"status_counts": {str(k): v for k, v in sorted(statuses.items())},
            "rejected_p50_ms": quantile(rejected_ms, 0.5), "rejected_p99_ms": quantile(rejected_ms, 0.99),
            "served_p50_ms": quantile(served_ms, 0.5),
            "rejected_server_p50_ms": quantile(rejected_server_ms, 0.5),
            "rejected_server_p99_ms": quantile(rejected_server_ms, 0.99),
            "served_server_p50_ms": quantile(served_server_ms, 0.5)}


def _server_timing_ms(header: str) -> Optional[float]:
    """The ``app`` entry of a Server-Timing header (``app;dur=1.234``), in ms; None when absent."""
    for entry in header.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        if name == "app":
            for p in params:
                if p.startswith("dur="):
                    return float(p[4:])
    return None
