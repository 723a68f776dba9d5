"""Admission latency over TLS: ``python -m bench.admission [--reviews N]``.

Starts the webhook server in this process on 127.0.0.1 with a fresh certificate, then
sends N sequential AdmissionReviews on one keep-alive connection, cycling through the
three routes with realistic bodies (the seed VM, a resize of a running VM, a VM pod).
Prints ``name=value`` lines; the goal is ``admission_p99_ms`` <= 20.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.webhook.certs import write_serving_cert
from adapters.webhook.server import WebhookServer
from core.constants import API_GROUP, API_VERSION, KIND, VM_CONTAINER, VM_NAME_LABEL

GOAL_P99_MS = 20.0


def _vm(cores: int, memory: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": "bench-vm", "namespace": "bench", "uid": "bench-uid"},
        "spec": {
            "instance": {
                "cpu": {"sockets": 2, "coresPerSocket": cores},
                "memory": {"size": memory},
            }
        },
    }
    if status:
        obj["status"] = status
    return obj


RUNNING = {
    "phase": "Running",
    "capacity": {"maxVcpus": 16, "maxMemory": "20Gi", "bootMemory": "4Gi"},
}
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "bench-vm-pod",
        "namespace": "bench",
        "labels": {VM_NAME_LABEL: "bench-vm"},
    },
    "spec": {"containers": [{"name": VM_CONTAINER, "image": "vmm"}]},
}


def _review(uid: str, kind: str, operation: str, obj: dict, old: dict | None = None) -> bytes:
    request: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": kind},
        "operation": operation,
        "namespace": "bench",
        "name": obj["metadata"]["name"],
        "object": obj,
    }
    if old is not None:
        request["oldObject"] = old
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


def _workload(i: int) -> tuple[str, bytes]:
    uid = f"bench-{i}"
    match i % 4:
        case 0:
            return "/mutate-vm", _review(uid, KIND, "CREATE", _vm(4, "4Gi"))
        case 1:
            return "/validate-vm", _review(uid, KIND, "CREATE", _vm(4, "4Gi"))
        case 2:
            old = _vm(4, "4Gi", RUNNING)
            return "/validate-vm", _review(uid, KIND, "UPDATE", _vm(6, "8Gi", RUNNING), old)
        case _:
            return "/mutate-pod", _review(uid, "Pod", "CREATE", POD)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(reviews: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        bundle = write_serving_cert(directory, dns_names=["localhost"], ips=["127.0.0.1"])
        server = WebhookServer(
            directory / "tls.crt", directory / "tls.key", vm_lookup=lambda ns, name: _vm(4, "4Gi")
        )
        server.start()
        context = ssl.create_default_context(cadata=bundle.decode())
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
        samples: list[float] = []
        try:
            connection.connect()  # the handshake is not part of a review's latency
            for i in range(reviews):
                route, body = _workload(i)
                started = time.perf_counter()
                connection.request("POST", route, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
                samples.append((time.perf_counter() - started) * 1000)
                if response.status != 200 or b'"uid": "' + f"bench-{i}".encode() not in data:
                    raise SystemExit(
                        f"review {i} on {route}: HTTP {response.status} {data[:200]!r}"
                    )
        finally:
            connection.close()
            server.stop()
    return {
        "admission_reviews": reviews,
        "admission_p50_ms": _percentile(samples, 0.50),
        "admission_p99_ms": _percentile(samples, 0.99),
        "admission_max_ms": max(samples),
        "admission_mean_ms": statistics.fmean(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__)
    parser.add_argument("--reviews", type=int, default=1000)
    args = parser.parse_args(argv)
    for name, value in run(args.reviews).items():
        print(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}")
    print(f"admission_p99_goal_ms={GOAL_P99_MS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
