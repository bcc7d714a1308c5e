"""``skipserve serve``: start (or join) Ray, run the application, block until interrupted."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

APP_NAME = "skipserve"


def replica_cpus(cores: int, replicas: int) -> float:
    """The CPUs Ray reserves for one replica by default: its share of the machine."""
    return max(1.0, cores / replicas)


def replica_threads(num_cpus: float) -> int:
    """Torch threads of a replica with ``num_cpus`` by default: one less, for the proxy and event loops."""
    return max(1, int(num_cpus) - 1)


def start_ray(address: Optional[str], metrics_port: int, report_interval_ms: int = 2000) -> None:
    import ray

    # counters as counters only; Ray otherwise also exports each as a gauge of the same name
    os.environ.setdefault("RAY_EXPORT_COUNTER_AS_GAUGE", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": report_interval_ms})


def enable_direct_ingress(port: int) -> None:
    """Ray Serve's direct ingress: the replica runs its own HTTP server on ``port``, so a request
    skips the proxy actor and the replica's actor calls back to it for the body. Ray reads these
    variables when its processes start, so they must be set before Ray is."""
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)  # an exclusive bound


def serve_main(args: argparse.Namespace, checkpoint: Path) -> int:
    from serving.settings import AppArgs, model_name_for

    cores = os.cpu_count() or 1
    num_cpus = args.num_cpus or replica_cpus(cores, args.replicas)
    settings = AppArgs.parse({  # the flags as application args: a bad value fails here, before Ray starts
        "checkpoint": str(checkpoint), "model_name": args.model_name or model_name_for(args.checkpoint),
        "threads": args.threads or replica_threads(num_cpus), "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms, "max_queued_images": args.max_queued_images,
        "slo_p99_ms": args.slo_p99_ms, "min_budget": args.min_budget, "max_accuracy_drop": args.max_accuracy_drop})
    if args.direct_port:
        enable_direct_ingress(args.direct_port)
    from ray import serve

    from serving.app import bind_app

    start_ray(args.address, args.metrics_port)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(bind_app(settings, num_replicas=args.replicas, num_cpus=num_cpus), name=APP_NAME, route_prefix="/")
    where = "the cluster's metrics port" if args.address else f"http://127.0.0.1:{args.metrics_port}/metrics"
    autopilot = (f"; SLO autopilot p99 <= {settings.slo_p99_ms:g} ms, top-1 drop <= {settings.max_accuracy_drop:g} pp, "
                 f"budget >= {settings.min_budget:g}"
                 if settings.slo_p99_ms else "")
    direct = f" and, without the proxy hop, http://{args.host}:{args.direct_port}" if args.direct_port else ""
    print(f"skipserve: serving {settings.model_name!r} ({checkpoint}) on http://{args.host}:{args.port}{direct}"
          f"{autopilot} "
          f"with {args.replicas} replica(s) x {settings.threads} thread(s); metrics at {where}; "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0
