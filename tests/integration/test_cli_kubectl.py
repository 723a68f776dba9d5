"""`kubectl chscale resize ... --wait` against the local stack, as a user runs it (kubectl
finds the plugin on PATH; KUBECONFIG from the stack), and the controller's /metrics
afterwards: prometheus_client's process metrics and the resize step histograms."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.k8s.client import Kube
from adapters.k8s.vms import vm_path
from apps.cli.main import Exit
from apps.cli.vmops import Follower, apply_vm, converged
from testbed.localstack.stack import NodeSpec, Stack

pytestmark = pytest.mark.integration

NODE = "cli-node"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
VENV_BIN = Path(sys.executable).parent


def the_vm(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "instance": {"cpu": {"sockets": 2, "coresPerSocket": 4}, "memory": {"size": "4Gi"}},
            "nodeSelector": {"kubernetes.io/hostname": NODE},
        },
    }


@pytest.fixture(scope="module")
def stack(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("cli"),
        nodes=[NodeSpec(NODE, "32", "64Gi")],  # room for each test's VM
        control_plane=control_plane,
    )
    s.start()
    yield s
    s.stop()


def kubectl(stack: Stack, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "KUBECONFIG": str(stack.kubeconfig),
    }
    return subprocess.run(
        [KUBECTL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def scrape(port: int) -> str:
    """What `curl http://127.0.0.1:PORT/metrics` shows (curl itself when installed)."""
    url = f"http://127.0.0.1:{port}/metrics"
    curl = shutil.which("curl")
    if curl is not None:
        done = subprocess.run(
            [curl, "-sSf", "--max-time", "10", url], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture
def my_vm(stack: Stack, namespace: str, kube: Kube) -> str:
    apply_vm(kube, the_vm("my-vm"), namespace)
    Follower(kube, namespace, "my-vm").wait(converged, 90)
    return namespace


def test_kubectl_chscale_resize_waits_and_prints_the_final_status(
    stack: Stack, my_vm: str, kube: Kube
) -> None:
    assert Path(KUBECTL).exists(), "kubectl is needed for the plugin test"
    listed = kubectl(stack, "plugin", "list")
    assert "kubectl-chscale" in listed.stdout, listed.stdout + listed.stderr

    done = kubectl(stack, "chscale", "resize", "my-vm", "-n", my_vm, "--cpus", "12", "--wait")
    assert done.returncode == Exit.OK, done.stdout + done.stderr
    assert "ok: resized" in done.stdout
    assert "  phase:     Running" in done.stdout
    assert "  spec:      12 vCPUs (2 sockets x 6 cores), memory 4Gi" in done.stdout
    assert "  allocated: 12 vCPUs, memory 4Gi" in done.stdout
    obj = kube.get(vm_path(my_vm, "my-vm"))
    assert obj["spec"]["instance"]["cpu"] == {"sockets": 2, "coresPerSocket": 6}
    assert obj["status"]["allocated"]["vcpus"] == 12

    # The seed's own units, and memory as a Kubernetes quantity.
    done = kubectl(
        stack,
        "chscale",
        "resize",
        "my-vm",
        "-n",
        my_vm,
        "--sockets",
        "1",
        "--cores-per-socket",
        "10",
        "--memory",
        "6Gi",
        "--wait",
    )
    assert done.returncode == Exit.OK, done.stdout + done.stderr
    assert "  allocated: 10 vCPUs, memory 6Gi" in done.stdout

    # What the controller's metrics endpoint shows after those resizes.
    text = scrape(stack.metrics_ports["controller-0"])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    counts = {
        (s.labels["step"], s.labels["outcome"]): s.value
        for s in families["chscale_controller_resize_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    # A grow is pod step first, then the guest (RESIZE.md §4): both seen by the controller.
    assert counts.get(("pod", "next"), 0) >= 1, counts
    assert sum(v for (step, _), v in counts.items() if step == "vmm") >= 1, counts
    events = {
        s.labels["reason"]: s.value
        for s in families["chscale_controller_events"].samples
        if s.name.endswith("_total")
    }
    assert events.get("VMResizeInitiated", 0) >= 2, events
    conditions = families["chscale_controller_condition_transitions"].samples
    assert any(
        s.labels == {"type": "Resized", "status": "True", "reason": "Resized"} for s in conditions
    ), conditions


def test_kubectl_chscale_exit_codes(stack: Stack, my_vm: str) -> None:
    missing = kubectl(stack, "chscale", "resize", "no-such-vm", "-n", my_vm, "--cpus", "2")
    assert missing.returncode == Exit.NOT_FOUND, missing.stdout + missing.stderr
    assert "no such VirtualMachine" in missing.stderr

    # 3 GiB + 1 MiB: not a multiple of 2Mi; the validating webhook names the field.
    refused = kubectl(stack, "chscale", "resize", "my-vm", "-n", my_vm, "--memory", "3073Mi")
    assert refused.returncode == Exit.REFUSED, refused.stdout + refused.stderr
    assert "memory" in refused.stderr and "resize refused" in refused.stderr

    usage = kubectl(stack, "chscale", "resize", "my-vm", "--cpus", "0")
    assert usage.returncode == Exit.USAGE
    assert "--cpus: must be at least 1" in usage.stderr

    helped = kubectl(stack, "chscale", "resize", "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: kubectl chscale resize")
    assert "exit codes:" in helped.stdout
