"""The floor of a resize: the calls it needs, made back to back by a benchmark alone.

With chscale's controller and node daemon stopped, a :class:`FloorVm` (a VM and a pod
that no component acts on: the pod is bound to a node no kubelet serves) makes, per
resize, what chscale's components and the kubelet would: the spec patch through the
admission webhooks (a read, then a merge patch, as ``chscale resize`` does), the VM
status write of each phase, conditional on the version the previous write returned,
the ``pods/resize`` patch, the pod status write the kubelet makes once it has actuated,
and, when given a VMM, one ``vm.resize`` on its socket. Events are not part of it: they
carry nothing the next step waits for. ADR 0015 says why this is the floor.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.k8s.client import AlreadyExists, Kube
from adapters.k8s.vms import vm_path
from apps.cli.vmops import apply_vm, resize_vm
from core.constants import POD_MEMORY_OVERHEAD, VM_CONTAINER, MiB
from core.quantity import parse_bytes
from testbed.kubelet.vmm import DEFAULT_VMM_COMMAND
from testbed.localstack.stack import Stack
from testbed.procs import Child

# No kubelet serves this node, so nothing acts on a floor pod but the benchmark.
FLOOR_NODE = "chscale-floor-nowhere"
VMM_START_TIMEOUT_S = 30.0

Size = tuple[int, str]  # (vCPUs, guest memory as a quantity, e.g. "2Gi")


def vm_object(name: str, size: Size) -> dict[str, Any]:
    vcpus, memory = size
    return {
        "metadata": {"name": name},
        "spec": {
            "instance": {"cpu": {"sockets": 1, "coresPerSocket": vcpus}, "memory": {"size": memory}}
        },
    }


def pod_memory(memory: str) -> str:
    """The pod's memory for a guest of ``memory``: plus the VMM overhead, in Mi."""
    return f"{(parse_bytes(memory) + POD_MEMORY_OVERHEAD) // MiB}Mi"


def register_floor_node(kube: Kube) -> None:
    """The floor's node, as an object no kubelet heartbeats for: without it the real
    kube-controller-manager's pod garbage collector deletes the floor's pods as orphans
    (bound to a node that does not exist) 40 s after they are made, which a floor of a
    thousand VMs outlasts. Unschedulable, so the scheduler never places a pod there."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": FLOOR_NODE, "labels": {"chscale.io/floor": "true"}},
        "spec": {"unschedulable": True},
    }
    with contextlib.suppress(AlreadyExists):
        kube.create("/api/v1/nodes", node)


def floor_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of a VM pod's spec, named ``name``, bound to a node no kubelet serves."""
    spec = copy.deepcopy(template["spec"])
    spec["nodeName"] = FLOOR_NODE
    namespace = template["metadata"]["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def pod_status(template: dict[str, Any], size: Size, generation: int) -> dict[str, Any]:
    """The pod status the kubelet writes once a resize to ``size`` is actuated (template:
    a VM pod's status as the simulated kubelet last wrote it)."""
    status = copy.deepcopy(template)
    vcpus, memory = size
    values = {"cpu": str(vcpus), "memory": pod_memory(memory)}
    for container in status.get("containerStatuses") or []:
        if container.get("name") == VM_CONTAINER:
            container["resources"] = {"requests": dict(values), "limits": dict(values)}
            container["allocatedResources"] = dict(values)
    status["observedGeneration"] = generation
    return status


def vm_status(
    template: dict[str, Any], phase: str, generation: int, size: Size, done: bool, pod: str
) -> dict[str, Any]:
    """The VM status of one phase of a resize to ``size`` (template: a VM's status as
    chscale last wrote it); ``done`` also sets what the guest holds."""
    status = copy.deepcopy(template)
    vcpus, memory = size
    status["phase"] = phase
    status["observedGeneration"] = generation
    status["desired"] = {"vcpus": vcpus, "memory": memory}
    status["vmPodName"] = pod
    if done:
        status["allocated"] = {"vcpus": vcpus, "memory": memory}
    return status


def start_vmm(stack: Stack, name: str, small: Size, large: Size) -> CloudHypervisorClient:
    """A Cloud Hypervisor simulator booted at ``small`` with room for ``large``, whose
    guest ejects vCPUs at once: the floor counts the VMM call, not the guest's ACPI
    ejection (guest time). The stack stops it with its own processes."""
    socket = Path(tempfile.mkdtemp(prefix="chs-floor-")) / "ch.sock"
    hotplug = parse_bytes(large[1]) - parse_bytes(small[1])
    stack.children[f"floor-vmm-{name}"] = Child(
        f"floor-vmm-{name}",
        [
            *DEFAULT_VMM_COMMAND,
            "--api-socket",
            f"path={socket}",
            "--cpus",
            f"boot={small[0]},max={large[0]}",
            "--memory",
            f"size={parse_bytes(small[1])},hotplug_method=virtio-mem,hotplug_size={hotplug}",
            "--sim-eject-delay",
            "0",
            "--sim-name",
            name,
            # A VMM validates its boot config: no kernel, no boot (the stack's
            # placeholder boots the simulated guest).
            *(["--kernel", stack.kernel] if stack.kernel else []),
        ],
        stack.logs / f"floor-vmm-{name}.log",
    )
    deadline = time.monotonic() + VMM_START_TIMEOUT_S
    while not socket.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the floor's VMM did not listen on {socket}")
        time.sleep(0.02)
    vmm = CloudHypervisorClient(str(socket), vm=name)
    vmm.ping()
    return vmm


class FloorVm:
    """One VM and pod nobody else acts on, and the calls of one resize, timed."""

    def __init__(
        self,
        kube: Kube,
        name: str,
        vm_template: dict[str, Any],
        pod_template: dict[str, Any],
        small: Size,
        large: Size,
        vmm: CloudHypervisorClient | None = None,
    ) -> None:
        self.kube, self.name, self.small, self.large, self.vmm = kube, name, small, large, vmm
        self.namespace = vm_template["metadata"]["namespace"]
        self.pod_name = f"vm-{name}"
        self.vm_template = vm_template["status"]
        self.pod_template = pod_template["status"]
        self.vm_url = vm_path(self.namespace, name)
        self.pod_url = f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"
        pod = kube.create(
            f"/api/v1/namespaces/{self.namespace}/pods", floor_pod(pod_template, self.pod_name)
        )
        self.pod_uid = pod["metadata"]["uid"]
        kube.patch(
            f"{self.pod_url}/status",
            {"metadata": {"uid": self.pod_uid}, "status": self.pod_template},
        )
        vm = apply_vm(kube, vm_object(name, small), self.namespace)
        self.vm_rv = vm["metadata"]["resourceVersion"]
        self._status("Running", int(vm["metadata"]["generation"]), small, True)

    def _status(self, phase: str, generation: int, size: Size, done: bool) -> None:
        body = vm_status(self.vm_template, phase, generation, size, done, self.pod_name)
        self.vm_rv = self.kube.patch_status(self.vm_url, body, self.vm_rv)["metadata"][
            "resourceVersion"
        ]

    def _pod_step(self, size: Size) -> None:
        vcpus, memory = size
        resized = self.kube.resize_pod(
            self.namespace, self.pod_name, VM_CONTAINER, str(vcpus), pod_memory(memory)
        )
        generation = int(resized["metadata"].get("generation") or 1)
        self.kube.patch(
            f"{self.pod_url}/status",
            {
                "metadata": {"uid": self.pod_uid},
                "status": pod_status(self.pod_template, size, generation),
            },
        )

    def _vmm_step(self, size: Size) -> None:
        if self.vmm is not None:
            self.vmm.resize(desired_vcpus=size[0], desired_ram=parse_bytes(size[1]))

    def one(self, grow: bool) -> float:
        """One resize's calls (grow: pod first; shrink: guest first), in seconds."""
        size = self.large if grow else self.small
        started = time.perf_counter()
        resized = resize_vm(self.kube, self.namespace, self.name, size[0], size[1])
        generation = int(resized["metadata"]["generation"])
        # The controller decides from the object the spec patch produced.
        self.vm_rv = resized["metadata"]["resourceVersion"]
        if grow:
            self._status("PodResizeInProgress", generation, size, False)
            self._pod_step(size)
            self._status("ResizeInProgress", generation, size, False)
            self._vmm_step(size)
        else:
            self._status("ResizeInProgress", generation, size, False)
            self._vmm_step(size)
            self._status("PodResizeInProgress", generation, size, False)
            self._pod_step(size)
        self._status("Running", generation, size, True)
        self.kube.get(self.vm_url)  # the reader's confirmation of the end state
        return time.perf_counter() - started


def stop_chscale(stack: Stack) -> None:
    """Stop the controller(s) and node daemons: from here on, nothing reacts to writes."""
    for name in sorted(stack.children):
        if name.startswith(("controller-", "daemon-")):
            stack.children[name].stop()
