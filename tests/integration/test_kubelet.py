"""The simulated kubelet against the real API server, one fresh node per test.

The kubelet adapter runs in-process (its sync loop in a thread), with the Cloud
Hypervisor simulator as the VMM, or a stand-in VMM (``STAND_IN``) where a test needs to
set what the VMM process holds or make it exit. Assertions are about the objects the API
server holds (pods, node, lease) and about what the VMM answers, never about calls made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.errors import VmmUnreachable
from adapters.cloudhypervisor.types import VmmPing
from adapters.k8s.client import Kube, NotFound, load_api_client
from core.constants import GiB, MiB
from core.podlayout import vmm_socket_path
from core.quantity import parse_bytes, parse_millicores
from sim.kubelet import HOSTNAME_LABEL, KubeletConfig
from testbed.kubelet import main as kubelet_main
from testbed.kubelet.agent import LEASE_NAMESPACE, KubeletAgent
from testbed.kubelet.vmm import VmmRuntime, read_sim_guest, read_vmrss

pytestmark = pytest.mark.integration

VMM = (sys.executable, "-m", "testbed.chsim.main")
CONTAINER = "vm-manager"
NODE_CPU, NODE_MEMORY = 4000, 8 * GiB
TIMEOUT_S = 30.0

# A stand-in VMM on the API socket: answers vmm.ping, and GET /api/v1/sim.guest as the
# Cloud Hypervisor simulator does, from the file "rss" next to the socket (404 without
# it, as a real cloud-hypervisor answers); exits with the code in the file "exit".
STAND_IN_CODE = r"""
import json, os, socketserver, sys, threading, time
from http.server import BaseHTTPRequestHandler
sock = sys.argv[sys.argv.index("--api-socket") + 1].removeprefix("path=")
here = os.path.dirname(sock)
def read(name):
    try:
        with open(os.path.join(here, name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
class Handler(BaseHTTPRequestHandler):
    def address_string(self):
        return "vmm"
    def log_message(self, *args):
        pass
    def do_GET(self):
        rss = read("rss")
        if self.path == "/api/v1/vmm.ping":
            self.send(200, {"build_version": "stand-in", "version": "v0", "pid": os.getpid()})
        elif self.path == "/api/v1/sim.guest" and rss is not None:
            self.send(200, {"memory_held": int(rss), "vcpus_online": 1, "rss": int(rss)})
        else:
            self.send(404, None)
    def send(self, code, body):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
server = Server(sock, Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
while True:
    code = read("exit")
    if code is not None:
        os._exit(int(code))
    time.sleep(0.05)
"""
STAND_IN = (sys.executable, "-c", STAND_IN_CODE)


@pytest.fixture
def kube(control_plane: Any) -> Kube:
    return Kube(load_api_client(str(control_plane.kubeconfig_path)))


@pytest.fixture
def ns(namespace: Any) -> str:
    return namespace if isinstance(namespace, str) else namespace["metadata"]["name"]


def placeholder_kernel(directory: str) -> str:
    path = os.path.join(directory, "vmlinux")
    open(path, "wb").close()
    return path


@pytest.fixture
def socket_root() -> Iterator[str]:
    # Short and under /tmp: a Unix socket path must fit in 107 bytes.
    root = tempfile.mkdtemp(prefix="chk-", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def pod_body(
    ns: str, name: str, cpu: str, memory: str, node: str, restart_policy: str = "Always"
) -> dict[str, Any]:
    """A VM-like pod: one guaranteed container, resizable in place, bound for ``node``."""
    values = {"cpu": cpu, "memory": memory}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeSelector": {HOSTNAME_LABEL: node},
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": CONTAINER,
                    "image": "chscale/vmm:test",
                    "resources": {"requests": values, "limits": values},
                    "resizePolicy": [
                        {"resourceName": "cpu", "restartPolicy": "NotRequired"},
                        {"resourceName": "memory", "restartPolicy": "NotRequired"},
                    ],
                }
            ],
        },
    }


class Node:
    """A running simulated kubelet and the helpers a test needs around it."""

    def __init__(self, kube: Kube, ns: str, agent: KubeletAgent, runtime: VmmRuntime) -> None:
        self.kube, self.ns, self.agent, self.runtime = kube, ns, agent, runtime
        self.name = agent.config.node_name

    def pod_path(self, name: str) -> str:
        return f"/api/v1/namespaces/{self.ns}/pods/{name}"

    def create_pod(
        self, name: str, cpu: str, memory: str, restart_policy: str = "Always"
    ) -> dict[str, Any]:
        body = pod_body(self.ns, name, cpu, memory, self.name, restart_policy)
        return self.kube.create(f"/api/v1/namespaces/{self.ns}/pods", body)

    def get(self, name: str) -> dict[str, Any]:
        return self.kube.get(self.pod_path(name))

    def wait(self, name: str, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        pod: dict[str, Any] = {}
        while time.monotonic() < deadline:
            pod = self.get(name)
            if check(pod):
                return pod
            time.sleep(0.05)
        raise AssertionError(f"pod {name}: {what} not reached in {TIMEOUT_S}s; last: {pod}")

    def running(self, name: str) -> dict[str, Any]:
        return self.wait(name, "Running", lambda p: p.get("status", {}).get("phase") == "Running")

    def resize(self, name: str, cpu: str, memory: str) -> dict[str, Any]:
        return self.kube.resize_pod(self.ns, name, CONTAINER, cpu, memory)

    def history(
        self, pod: dict[str, Any], until: Callable[[dict[str, Any]], bool]
    ) -> list[dict[str, Any]]:
        """Every version of the pod after ``pod`` (from a watch), up to the first one for
        which ``until`` holds."""
        meta = pod["metadata"]
        query = {
            "watch": "true",
            "fieldSelector": f"metadata.name={meta['name']}",
            "resourceVersion": meta["resourceVersion"],
            "timeoutSeconds": int(TIMEOUT_S),
        }
        seen = []
        path = f"/api/v1/namespaces/{self.ns}/pods"
        for event in self.kube.stream(path, query, timeout=TIMEOUT_S + 5):
            if event.get("type") != "MODIFIED":
                continue
            seen.append(event["object"])
            if until(event["object"]):
                return seen
        raise AssertionError(f"pod {meta['name']}: watch ended first; saw {seen}")

    def delete_all(self) -> None:
        pods = self.kube.get(f"/api/v1/namespaces/{self.ns}/pods")["items"]
        for pod in pods:
            if pod["spec"].get("nodeName") == self.name:
                self.kube.delete(self.pod_path(pod["metadata"]["name"]))
        for pod in pods:
            if pod["spec"].get("nodeName") == self.name:
                self.gone(pod["metadata"]["name"])

    def gone(self, name: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                self.get(name)
            except NotFound:
                return
            time.sleep(0.05)
        raise AssertionError(f"pod {name} still exists after {TIMEOUT_S}s")


def node_name() -> str:
    return f"kubelet-{uuid.uuid4().hex[:8]}"


@contextmanager
def kubelet(
    kube: Kube,
    ns: str,
    socket_root: str,
    name: str | None = None,
    every_namespace: bool = False,
    vmm: tuple[str, ...] = VMM,
    **config: Any,
) -> Iterator[Node]:
    name = name or node_name()
    runtime = VmmRuntime(socket_root, vmm)
    agent = KubeletAgent(
        kube,
        KubeletConfig(name, cpu=NODE_CPU, memory=NODE_MEMORY, **config),
        runtime,
        heartbeat_s=1.0,
        # Other tests leave pending pods behind on the shared API server: not ours to run.
        namespace=None if every_namespace else ns,
    )
    agent.start()
    node = Node(kube, ns, agent, runtime)
    try:
        yield node
        node.delete_all()  # while the kubelet runs, so that it confirms the deletions
    finally:
        agent.stop()
        kube.delete(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}")
        kube.delete(f"/api/v1/nodes/{name}")


def answering(socket: str) -> VmmPing:
    deadline = time.monotonic() + TIMEOUT_S
    with CloudHypervisorClient(socket, timeout=1.0) as vmm:
        while True:
            try:
                return vmm.ping()
            except VmmUnreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in pod.get("status", {}).get("conditions") or ():
        if c["type"] == type_:
            return c
    return None


def actual(pod: dict[str, Any]) -> tuple[int, int, int, int]:
    """(cpu request, cpu limit, memory request, memory limit) of the container's status."""
    (cs,) = pod["status"]["containerStatuses"]
    r = cs["resources"]
    return (
        parse_millicores(r["requests"]["cpu"]),
        parse_millicores(r["limits"]["cpu"]),
        parse_bytes(r["requests"]["memory"]),
        parse_bytes(r["limits"]["memory"]),
    )


def allocated(pod: dict[str, Any]) -> tuple[int, int]:
    (cs,) = pod["status"]["containerStatuses"]
    a = cs["allocatedResources"]
    return parse_millicores(a["cpu"]), parse_bytes(a["memory"])


def settled(generation: int) -> Callable[[dict[str, Any]], bool]:
    """The kubelet has seen ``generation`` and has nothing left in flight for it."""

    def check(pod: dict[str, Any]) -> bool:
        return (
            pod["status"].get("observedGeneration", 0) >= generation
            and condition(pod, "PodResizeInProgress") is None
            and condition(pod, "PodResizePending") is None
        )

    return check


def test_a_pod_is_bound_and_runs_with_its_resources(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root) as node:
        obj = kube.get(f"/api/v1/nodes/{node.name}")
        assert obj["metadata"]["labels"][HOSTNAME_LABEL] == node.name
        assert parse_millicores(obj["status"]["allocatable"]["cpu"]) == NODE_CPU
        assert parse_bytes(obj["status"]["allocatable"]["memory"]) == NODE_MEMORY
        ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
        lease = kube.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{node.name}"
        )
        assert lease["spec"]["holderIdentity"] == node.name

        node.create_pod("vm-a", "1500m", "1536Mi")
        pod = node.running("vm-a")
        assert pod["spec"]["nodeName"] == node.name
        assert pod["status"]["observedGeneration"] == pod["metadata"]["generation"]
        assert condition(pod, "Ready")["status"] == "True"
        (cs,) = pod["status"]["containerStatuses"]
        assert cs["ready"] is True and cs["started"] is True
        assert "startedAt" in cs["state"]["running"]
        assert actual(pod) == (1500, 1500, 1536 * MiB, 1536 * MiB)
        assert allocated(pod) == (1500, 1536 * MiB)
        # The pod's VMM listens where the node daemon looks for it (once it is up: the
        # container runs from the moment its process starts, as with any runtime).
        uid = pod["metadata"]["uid"]
        assert answering(vmm_socket_path(socket_root, uid)).pid == node.runtime.running()[uid]


def test_a_refused_binding_does_not_hold_up_the_other_pods(kube, ns, socket_root, control_plane):
    # CI run of stop 10: pods left pending in namespaces being deleted (the API server
    # refuses to bind them) stopped every later pod from being bound on that node.
    name = node_name()
    doomed = control_plane.create_namespace(f"{ns[:50]}-gone")
    kube.create(f"/api/v1/namespaces/{doomed}/pods", pod_body(doomed, "stuck", "1", "1Gi", name))
    control_plane.delete_namespace(doomed)
    with kubelet(kube, ns, socket_root, name=name, every_namespace=True) as node:
        node.create_pod("vm-a", "1", "1Gi")
        assert node.running("vm-a")["spec"]["nodeName"] == name
        stuck = kube.get(f"/api/v1/namespaces/{doomed}/pods/stuck")
        assert not stuck["spec"].get("nodeName")


def test_a_resize_goes_through_in_progress_and_completes(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root, resize_delay_s=1.0) as node:
        node.create_pod("vm-a", "1", "1Gi")
        node.running("vm-a")
        patched = node.resize("vm-a", "2", "2Gi")
        generation = patched["metadata"]["generation"]
        assert generation == 2
        seen = node.history(patched, settled(generation))
        in_progress = [condition(p, "PodResizeInProgress") for p in seen]
        during = [c for c in in_progress if c is not None]
        assert during, "PodResizeInProgress never appeared"
        assert all(c.get("observedGeneration") == generation for c in during)
        assert all("reason" not in c for c in during)
        first = seen[[c is not None for c in in_progress].index(True)]
        assert allocated(first) == (2000, 2 * GiB)  # allocated before actuated
        assert actual(first) == (1000, 1000, GiB, GiB)
        final = seen[-1]
        assert final["status"]["observedGeneration"] == final["metadata"]["generation"]
        assert actual(final) == (2000, 2000, 2 * GiB, 2 * GiB)
        assert allocated(final) == (2000, 2 * GiB)


def test_a_resize_beyond_the_node_is_infeasible(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root) as node:
        node.create_pod("vm-a", "1", "1Gi")
        node.running("vm-a")
        generation = node.resize("vm-a", "8", "1Gi")["metadata"]["generation"]
        pod = node.wait(
            "vm-a",
            "PodResizePending",
            lambda p: (
                (condition(p, "PodResizePending") or {}).get("observedGeneration") == generation
            ),
        )
        pending = condition(pod, "PodResizePending")
        assert pending["reason"] == "Infeasible"
        assert pending["message"] == (
            "Node didn't have enough capacity: cpu, requested: 8000, capacity: 4000"
        )
        assert pod["status"]["observedGeneration"] == generation
        assert actual(pod) == (1000, 1000, GiB, GiB)


def test_a_deferred_resize_is_accepted_after_another_pod_is_deleted(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root, deferred_retry_s=300.0) as node:
        node.create_pod("vm-a", "2", "1Gi")
        node.running("vm-a")
        node.create_pod("vm-b", "2", "1Gi")
        node.running("vm-b")
        generation = node.resize("vm-a", "3", "1Gi")["metadata"]["generation"]
        pod = node.wait(
            "vm-a",
            "Deferred",
            lambda p: (
                (condition(p, "PodResizePending") or {}).get("observedGeneration") == generation
            ),
        )
        pending = condition(pod, "PodResizePending")
        assert pending["reason"] == "Deferred"
        assert pending["message"] == (
            "Node didn't have enough resource: cpu, requested: 3000, used: 2000, capacity: 4000"
        )
        assert actual(pod) == (2000, 2000, GiB, GiB)

        node.kube.delete(node.pod_path("vm-b"))  # an ordinary, graceful delete
        node.gone("vm-b")  # the kubelet stopped its VMM and confirmed the deletion
        pod = node.wait("vm-a", "resized", settled(generation))
        assert actual(pod) == (3000, 3000, GiB, GiB)
        assert pod["status"]["observedGeneration"] == generation


def stand_in_file(socket_root: str, uid: str, name: str, value: int) -> None:
    """Tell the pod's stand-in VMM something (written whole: it may read at any time)."""
    directory = os.path.dirname(vmm_socket_path(socket_root, uid))
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(str(value))
    os.replace(tmp, os.path.join(directory, name))


def stand_in_up(socket_root: str, uid: str) -> None:
    socket = vmm_socket_path(socket_root, uid)
    deadline = time.monotonic() + TIMEOUT_S
    while read_sim_guest(socket, timeout=1.0) is None:
        assert time.monotonic() < deadline, "the stand-in VMM never answered sim.guest"
        time.sleep(0.05)


def in_error(p: dict[str, Any]) -> bool:
    return (condition(p, "PodResizeInProgress") or {}).get("reason") == "Error"


def test_a_memory_decrease_to_what_the_vmm_holds_is_refused_until_it_lets_go(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root, vmm=STAND_IN, error_retry_s=0.5) as node:
        uid = node.create_pod("vm-a", "1", "3Gi")["metadata"]["uid"]
        node.running("vm-a")
        # The VMM process holds exactly the new limit: refused (usage >= limit).
        stand_in_file(socket_root, uid, "rss", GiB)
        stand_in_up(socket_root, uid)
        generation = node.resize("vm-a", "1", "1Gi")["metadata"]["generation"]
        pod = node.wait("vm-a", "Error", in_error)
        progress = condition(pod, "PodResizeInProgress")
        assert progress["observedGeneration"] == generation
        assert progress["message"] == (
            "cannot decrease memory limits: ["
            f"attempting to set pod memory limit ({GiB}) below current usage ({GiB}), "
            f'attempting to set container "vm-manager" memory limit ({GiB}) '
            f"below current usage ({GiB})]"
        )
        assert pod["status"]["observedGeneration"] == generation
        assert actual(pod) == (1000, 1000, 3 * GiB, 3 * GiB)  # the actual stays
        assert allocated(pod) == (1000, GiB)  # the allocation moved

        # Retried on every sync: the next reading is in the message.
        stand_in_file(socket_root, uid, "rss", GiB + 4096)
        pod = node.wait(
            "vm-a",
            "a retry",
            lambda p: (
                f"current usage ({GiB + 4096})"
                in (condition(p, "PodResizeInProgress") or {}).get("message", "")
            ),
        )
        assert actual(pod) == (1000, 1000, 3 * GiB, 3 * GiB)

        stand_in_file(socket_root, uid, "rss", GiB - 1)  # the VMM gives memory back
        pod = node.wait("vm-a", "resized", settled(generation))
        assert actual(pod) == (1000, 1000, GiB, GiB)


def test_a_vmm_without_sim_guest_is_charged_its_resident_memory(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root, vmm=STAND_IN, error_retry_s=0.5) as node:
        uid = node.create_pod("vm-a", "1", "1Gi")["metadata"]["uid"]
        node.running("vm-a")
        answering(vmm_socket_path(socket_root, uid))  # up, and answering 404 to sim.guest
        pid = node.runtime.running()[uid]
        resident = read_vmrss(pid)
        assert resident is not None and resident > 4 * MiB  # a Python process
        node.resize("vm-a", "1", "4Mi")
        pod = node.wait("vm-a", "Error", in_error)
        message = condition(pod, "PodResizeInProgress")["message"]
        used = int(message.rsplit("below current usage (", 1)[1].split(")")[0])
        # What /proc says the VMM process holds, give or take its own growth.
        assert abs(used - resident) < 64 * MiB, (used, resident)
        assert actual(pod) == (1000, 1000, GiB, GiB)


def test_a_vmm_that_exits_terminates_its_container_and_ends_the_pod(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root, vmm=STAND_IN) as node:
        uids = {
            name: node.create_pod(name, "500m", "256Mi", policy)["metadata"]["uid"]
            for name, policy in (
                ("vm-fails", "Never"),
                ("vm-done", "Never"),
                ("vm-killed", "Never"),
                ("vm-again", "Always"),
            )
        }
        for name, uid in uids.items():
            node.running(name)
            answering(vmm_socket_path(socket_root, uid))
        stand_in_file(socket_root, uids["vm-fails"], "exit", 3)
        stand_in_file(socket_root, uids["vm-done"], "exit", 0)
        os.kill(node.runtime.running()[uids["vm-killed"]], signal.SIGKILL)
        first_pid = node.runtime.running()[uids["vm-again"]]
        stand_in_file(socket_root, uids["vm-again"], "exit", 1)

        for name, phase, code, reason in (
            ("vm-fails", "Failed", 3, "Error"),
            ("vm-done", "Succeeded", 0, "Completed"),
            ("vm-killed", "Failed", 137, "Error"),
        ):
            pod = node.wait(name, phase, lambda p, ph=phase: p["status"].get("phase") == ph)
            (cs,) = pod["status"]["containerStatuses"]
            terminated = cs["state"]["terminated"]
            assert (terminated["exitCode"], terminated["reason"]) == (code, reason), name
            assert cs["ready"] is False
            assert condition(pod, "Ready")["status"] == "False"

        # restartPolicy Always: the VMM is started again, the pod runs on.
        def restarted(p: dict[str, Any]) -> bool:
            statuses = p["status"].get("containerStatuses") or [{}]
            return statuses[0].get("restartCount") == 1

        pod = node.wait("vm-again", "restarted", restarted)
        (cs,) = pod["status"]["containerStatuses"]
        assert pod["status"]["phase"] == "Running"
        assert cs["lastState"]["terminated"]["exitCode"] == 1
        os.unlink(
            os.path.join(os.path.dirname(vmm_socket_path(socket_root, uids["vm-again"])), "exit")
        )
        deadline = time.monotonic() + TIMEOUT_S
        while node.runtime.running().get(uids["vm-again"]) in (None, first_pid):
            assert time.monotonic() < deadline, "the VMM was not started again"
            time.sleep(0.05)


def test_the_node_reports_capacity_and_allocatable_and_judges_against_both(kube, ns, socket_root):
    config = {"reserved_cpu": 1000, "reserved_memory": GiB, "eviction_hard_memory": GiB}
    with kubelet(kube, ns, socket_root, deferred_retry_s=0.5, **config) as node:
        obj = kube.get(f"/api/v1/nodes/{node.name}")
        assert parse_millicores(obj["status"]["capacity"]["cpu"]) == NODE_CPU
        assert parse_bytes(obj["status"]["capacity"]["memory"]) == NODE_MEMORY
        assert parse_millicores(obj["status"]["allocatable"]["cpu"]) == NODE_CPU - 1000
        assert parse_bytes(obj["status"]["allocatable"]["memory"]) == NODE_MEMORY - 2 * GiB
        node.create_pod("vm-a", "1", "1Gi")
        node.running("vm-a")
        # 6.5Gi: within capacity minus reserved (7Gi), beyond allocatable (6Gi).
        generation = node.resize("vm-a", "1", "6656Mi")["metadata"]["generation"]
        pod = node.wait(
            "vm-a",
            "PodResizePending",
            lambda p: (
                (condition(p, "PodResizePending") or {}).get("observedGeneration") == generation
            ),
        )
        assert condition(pod, "PodResizePending")["reason"] == "Deferred"
        time.sleep(2)  # several periodic retries: still Deferred, nothing will free it
        assert condition(node.get("vm-a"), "PodResizePending")["reason"] == "Deferred"
        generation = node.resize("vm-a", "1", "7Gi")["metadata"]["generation"]
        pod = node.wait(
            "vm-a",
            "7Gi judged",
            lambda p: (
                (condition(p, "PodResizePending") or {}).get("observedGeneration") == generation
            ),
        )
        # 7Gi is exactly capacity minus reserved: feasible, still Deferred.
        assert condition(pod, "PodResizePending")["reason"] == "Deferred"
        generation = node.resize("vm-a", "1", "7169Mi")["metadata"]["generation"]
        pod = node.wait(
            "vm-a",
            "Infeasible",
            lambda p: (condition(p, "PodResizePending") or {}).get("reason") == "Infeasible",
        )
        assert condition(pod, "PodResizePending")["message"] == (
            f"Node didn't have enough capacity: memory, requested: {7169 * MiB}, "
            f"capacity: {7 * GiB}"
        )


# --- the command line -----------------------------------------------------------------


def test_every_knob_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        kubelet_main.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--system-reserved",
        "--kube-reserved",
        "--eviction-hard",
        "--cpu-manager-policy",
        "--memory-manager-policy",
        "--runtime-poll",
        "--deferred-retry-initial",
        "--deferred-retry",
        "--error-retry",
    ):
        assert flag in text, flag


def test_the_flags_reach_the_model():
    args = kubelet_main.parse_args(
        [
            "--node-name=n",
            "--cpu=8",
            "--memory=16Gi",
            "--system-reserved=cpu=500m,memory=1Gi",
            "--kube-reserved=cpu=500m,memory=512Mi",
            "--eviction-hard=memory.available<10%",
            "--cpu-manager-policy=static",
            "--memory-manager-policy=Static",
            "--runtime-poll=1",
            "--deferred-retry-initial=30",
            "--deferred-retry=180",
            "--error-retry=12",
        ]
    )
    config = kubelet_main.build_config(args)
    assert (config.cpu, config.memory) == (8000, 16 * GiB)
    assert (config.reserved_cpu, config.reserved_memory) == (1000, 1536 * MiB)
    assert config.eviction_hard_memory == int(16 * GiB * 0.1)
    assert config.allocatable_memory == 16 * GiB - 1536 * MiB - int(16 * GiB * 0.1)
    assert config.cpu_manager_static and config.memory_manager_static
    assert config.runtime_poll_s == 1.0
    assert (config.deferred_retry_initial_s, config.deferred_retry_s) == (30.0, 180.0)
    assert config.error_retry_s == 12.0
    defaults = kubelet_main.build_config(kubelet_main.parse_args(["--node-name=n"]))
    assert (defaults.reserved_cpu, defaults.reserved_memory, defaults.eviction_hard_memory) == (
        0,
        0,
        0,
    )
    assert not defaults.cpu_manager_static and defaults.runtime_poll_s == 0.0
    assert defaults.eviction_hard_memory == 0
    eviction = kubelet_main.parse_args(["--node-name=n", "--eviction-hard=memory.available<100Mi"])
    assert kubelet_main.build_config(eviction).eviction_hard_memory == 100 * MiB


@pytest.mark.parametrize(
    "argv",
    [
        ["--system-reserved=disk=1Gi"],
        ["--kube-reserved=cpu=lots"],
        ["--eviction-hard=nodefs.available<10%"],
        ["--cpu-manager-policy=dynamic"],
        ["--runtime-poll=-1"],
        ["--deferred-retry=soon"],
    ],
)
def test_bad_flags_are_refused_with_their_name(argv, capsys):
    with pytest.raises(SystemExit):
        kubelet_main.parse_args(["--node-name=n", *argv])
    assert argv[0].split("=")[0] in capsys.readouterr().err


def test_reserving_everything_is_refused():
    args = kubelet_main.parse_args(["--node-name=n", "--cpu=1", "--system-reserved=cpu=1"])
    with pytest.raises(SystemExit, match="nothing allocatable"):
        kubelet_main.build_config(args)


@pytest.mark.parametrize(
    ("answer", "status", "expected"),
    [
        ({"memory_held": 5, "vcpus_online": 1, "rss": 7}, 200, 7),
        ({"memory_held": 5, "vcpus_online": 1, "rss": "7"}, 200, None),
        ({"memory_held": 5, "vcpus_online": 1}, 200, None),
        ({"memory_held": 5, "vcpus_online": 1, "rss": -1}, 200, None),
        ([1, 2, 3], 200, None),
        ("not json", 200, None),
        ({"rss": 7}, 404, None),
    ],
)
def test_sim_guest_is_read_strictly(answer, status, expected):
    """The reading of sim.guest: only a 200 with every field a non-negative integer."""
    import http.server
    import socketserver
    import threading

    body = (answer if isinstance(answer, str) else json.dumps(answer)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def address_string(self) -> str:
            return "test"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            assert self.path == "/api/v1/sim.guest"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    root = tempfile.mkdtemp(prefix="chg-", dir="/tmp")
    sock = os.path.join(root, "api.sock")
    server = socketserver.UnixStreamServer(sock, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        report = read_sim_guest(sock, timeout=2.0)
        assert (report or {}).get("rss") == expected
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(root, ignore_errors=True)
    assert read_sim_guest(sock, timeout=0.5) is None  # nobody listens any more


def test_vmrss_is_read_from_proc():
    with open(f"/proc/{os.getpid()}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    expected = int(line.split()[1]) * 1024
    assert abs(read_vmrss(os.getpid()) - expected) < 64 * MiB
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert read_vmrss(child.pid) is None  # gone


def test_the_simulators_guest_is_what_a_memory_decrease_is_judged_by(kube, ns, socket_root):
    """End to end with the Cloud Hypervisor simulator: its sim.guest rss (guest memory
    held + the VMM's own) is the usage. Skipped while the simulator has no sim.guest
    (branch chsim adds it); the stand-in tests above cover the kubelet alone."""
    with kubelet(kube, ns, socket_root, error_retry_s=0.5) as node:
        uid = node.create_pod("vm-a", "1", "3Gi")["metadata"]["uid"]
        node.running("vm-a")
        socket = vmm_socket_path(socket_root, uid)
        answering(socket)
        assert read_sim_guest(socket) is not None, "the simulator answers sim.guest"
        with CloudHypervisorClient(socket) as vmm:
            vmm.create(
                {
                    "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
                    "memory": {
                        "size": 512 * MiB,
                        "hotplug_method": "VirtioMem",
                        "hotplug_size": 2 * GiB,
                    },
                    # The VMM opens the kernel at boot; an empty file will do.
                    "payload": {"kernel": placeholder_kernel(socket_root)},
                }
            )
            vmm.boot()
            vmm.resize(desired_ram=2 * GiB)
            deadline = time.monotonic() + TIMEOUT_S
            while (read_sim_guest(socket) or {}).get("memory_held") != 2 * GiB:
                assert time.monotonic() < deadline, "the guest never held 2Gi"
                time.sleep(0.05)
            rss = read_sim_guest(socket)["rss"]
            assert rss > 2 * GiB  # the guest's memory plus the VMM's own

            generation = node.resize("vm-a", "1", "2Gi")["metadata"]["generation"]
            pod = node.wait("vm-a", "Error", in_error)
            assert (
                f"below current usage ({rss})" in condition(pod, "PodResizeInProgress")["message"]
            )
            assert actual(pod) == (1000, 1000, 3 * GiB, 3 * GiB)
            vmm.resize(desired_ram=512 * MiB)  # the guest gives the memory back
            pod = node.wait("vm-a", "resized", settled(generation))
            assert actual(pod) == (1000, 1000, 2 * GiB, 2 * GiB)
