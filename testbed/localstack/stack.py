"""The local stack: a real control plane and chscale's own processes, on one machine.

etcd and kube-apiserver (built from the Go module proxy), the admission webhook, the
controller, and per simulated node a kubelet (which starts each VM pod's VMM: the Cloud
Hypervisor simulator, or a real ``cloud-hypervisor``) and a node daemon. Used by
``chscale up``/``demo``, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.constants import MILLICORES_PER_VCPU
from core.quantity import parse_millicores
from testbed.controlplane.launcher import (
    NOT_READY_TAINT,
    STACK_LABEL,
    WITHOUT_NODE_LIFECYCLE,
    ControlPlane,
    start_controller_manager,
    start_scheduler,
)
from testbed.node.images import VM_POD_IMAGE, VM_POD_KERNEL
from testbed.node.realnode import RealNode
from testbed.procs import Child, end_processes_mentioning, python_module

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StackError(RuntimeError):
    pass


PLACEHOLDER_KERNEL = "vmlinux"
KUBELET_KINDS = ("simulated", "real")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    cpu: str = "16"
    memory: str = "32Gi"
    vmm_command: str | None = None  # this node's VMM (default: the stack's)


class Stack:
    def __init__(
        self,
        state_dir: Path,
        *,
        nodes: int | list[NodeSpec] = 1,
        node_cpu: str = "16",
        node_memory: str = "32Gi",
        control_plane: ControlPlane | None = None,
        resize_delay: float = 0.0,
        vmm_command: str | None = None,
        kernel: str | None = None,
        controller_replicas: int = 1,
        webhook: bool = True,
        progress: Progress | None = None,
        kubeconfigs: Mapping[str, Path] | None = None,
        cluster_controllers: bool = True,
        kubelet: str = "simulated",
        component_args: tuple[str, ...] = (),
    ) -> None:
        """``kubeconfigs`` gives a component (``controller-<i>``, ``daemon-<node>``) its own
        kubeconfig instead of the stack's, e.g. one that points at a fault-injecting proxy.

        ``cluster_controllers`` runs the real kube-scheduler and kube-controller-manager
        (ADR 0014): the scheduler binds (the simulated kubelets do not), placing pods only
        onto this stack's nodes; False leaves binding to the simulated kubelets' first fit
        and quota, garbage collection and namespace deletion undone.

        ``kubelet`` is the node kind: ``simulated`` (testbed.kubelet, a node per
        ``NodeSpec`` with its cpu/memory) or ``real`` (containerd + runc + the kubelet
        v1.35 per ``NodeSpec``, the machine's own capacity; testbed.node.realnode)."""
        if kubelet not in KUBELET_KINDS:
            raise StackError(f"kubelet={kubelet!r}: expected one of {', '.join(KUBELET_KINDS)}")
        if kubelet == "real" and not cluster_controllers:
            raise StackError("kubelet='real' needs cluster_controllers: nothing else binds pods")
        self.kubelet = kubelet
        self.real_nodes: dict[str, RealNode] = {}
        self.state_dir = state_dir
        if isinstance(nodes, int):
            nodes = [
                NodeSpec(f"node-{chr(ord('a') + i)}", node_cpu, node_memory) for i in range(nodes)
            ]
        self.node_specs = nodes
        self.nodes = [n.name for n in nodes]
        self.resize_delay = resize_delay
        self.vmm_command = vmm_command
        self.kernel = kernel
        # Flags given to every controller and daemon (e.g. the kernel's deadlines).
        self.component_args = component_args
        self.controller_replicas = controller_replicas
        self.with_webhook = webhook
        self.progress = progress or (lambda _msg: None)
        self.kubeconfigs = dict(kubeconfigs or {})
        # A control plane passed in is shared (the test session's); one we start, we stop.
        self.control_plane: ControlPlane | None = control_plane
        self._own_control_plane = control_plane is None
        self.children: dict[str, Child] = {}
        self.metrics_ports: dict[str, int] = {}
        self._webhook_registered = False
        self._socket_root: Path | None = None
        self.cluster_controllers = cluster_controllers
        # Labels this stack's nodes for its scheduler: unique per run, so concurrent
        # stacks on one API server never place pods on each other's nodes.
        self.stack_id = f"{os.getpid()}-{os.urandom(3).hex()}"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def component_kubeconfig(self, name: str) -> Path:
        return self.kubeconfigs.get(name, self.kubeconfig)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    # --- start --------------------------------------------------------------------------

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.kernel is None:
            # A VMM opens the kernel at boot (the simulator too): an empty file boots the
            # simulated guest, so the daemons' default kernel is one in the state dir.
            placeholder = self.state_dir / PLACEHOLDER_KERNEL
            placeholder.touch()
            self.kernel = str(placeholder)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if self.control_plane is None:
            self.progress("starting etcd and kube-apiserver")
            self.control_plane = ControlPlane(self.state_dir / "controlplane")
            self.control_plane.start()
        cp = self.control_plane
        kubeconfig = str(cp.kubeconfig_path)
        self.kubeconfig.write_text(Path(kubeconfig).read_text())
        if self.with_webhook:
            self.progress("starting the admission webhook")
            self._start_webhook()
        if self.cluster_controllers:
            self.progress("starting kube-scheduler and kube-controller-manager")
            self._start_cluster_controllers()
        self.progress(f"starting {len(self.nodes)} {self.kubelet} node(s)")
        for node in self.node_specs:
            self._start_node(node)
        self.progress("starting the controller")
        for i in range(self.controller_replicas):
            self.start_controller(i)
        # A real kubelet registers, syncs its runtime and CNI first: more time on a
        # loaded 2-core machine.
        self._wait_nodes_ready(120.0 if self.real_nodes else 60.0)
        self._write_state()

    def start_controller(self, index: int = 0) -> Child:
        name = f"controller-{index}"
        port = self.metrics_ports.setdefault(name, free_port())
        args = ["--kubeconfig", str(self.component_kubeconfig(name)), "--metrics-port", str(port)]
        if self.kubelet == "real":
            # The real node runs the image it has, built locally (testbed.node.images).
            args += ["--image", VM_POD_IMAGE]
        if self.controller_replicas > 1:
            args += [
                "--leader-elect",
                "--lease-namespace",
                "default",
                "--identity",
                name,
                "--lease-duration",
                # Short enough for a quick takeover, long enough that a loaded 2-core
                # machine does not make a healthy leader miss its renewals and step down.
                "8",
            ]
        args += self.component_args
        child = Child(name, python_module("apps.controller.main", *args), self.logs / f"{name}.log")
        self.children[name] = child
        return child

    def start_daemon(self, node: str) -> Child:
        name = f"daemon-{node}"
        args = [
            "--kubeconfig",
            str(self.component_kubeconfig(name)),
            "--node-name",
            node,
            "--vmm-socket-root",
            str(self.socket_root(node)),
            "--metrics-port",
            "0",
        ]
        kernel = self.kernel
        if node in self.real_nodes and kernel == str(self.state_dir / PLACEHOLDER_KERNEL):
            kernel = VM_POD_KERNEL  # the VMM runs in its container: the image's placeholder
        if kernel:
            args += ["--kernel", kernel]
        args += self.component_args
        child = Child(name, python_module("apps.daemon.main", *args), self.logs / f"{name}.log")
        self.children[name] = child
        return child

    def socket_root(self, node: str) -> Path:
        if node in self.real_nodes:
            # The real kubelet's own pods directory (its --root-dir is the run's).
            return self.real_nodes[node].pods_root
        # Unix socket paths are limited to 108 bytes and the kubelet layout adds ~80
        # (<root>/<pod uid>/volumes/kubernetes.io~empty-dir/vmm/ch.sock): keep the root
        # short. Pod UIDs are unique, so the nodes can share it.
        if self._socket_root is None:
            self._socket_root = Path(tempfile.mkdtemp(prefix="chs-"))
        return self._socket_root

    def _start_cluster_controllers(self) -> None:
        assert self.control_plane is not None
        directory = self.state_dir / "cluster"
        self.children["kube-scheduler"] = start_scheduler(
            self.control_plane, directory, stack=self.stack_id
        )
        # A shared control plane carries the tests' bare Nodes, which post no heartbeats.
        controllers = ("*",) if self._own_control_plane else WITHOUT_NODE_LIFECYCLE
        self.children["kube-controller-manager"] = start_controller_manager(
            self.control_plane, directory, controllers=controllers
        )

    def _start_real_node(self, spec: NodeSpec) -> None:
        assert self.control_plane is not None
        if spec.vmm_command or self.vmm_command:
            # The VMM runs in the VM pod's container, from its image (testbed.node.images).
            log.warning("a real node ignores the VMM command", extra={"node": spec.name})
        node = RealNode(
            spec.name,
            self.state_dir / "nodes" / spec.name,
            self.control_plane,
            labels={STACK_LABEL: self.stack_id},
            # The CPUs the node offers, as on a simulated node; its memory is the
            # machine's, since a real node's guests really hold theirs (ADR 0014).
            cpus=max(parse_millicores(spec.cpu) // MILLICORES_PER_VCPU, 1),
        )
        self.real_nodes[spec.name] = node
        node.start()
        self.start_daemon(spec.name)

    def _start_node(self, spec: NodeSpec) -> None:
        if self.kubelet == "real":
            self._start_real_node(spec)
            return
        node = spec.name
        args = [
            "--kubeconfig",
            str(self.kubeconfig),
            "--node-name",
            node,
            "--cpu",
            spec.cpu,
            "--memory",
            spec.memory,
            "--state-dir",
            str(self.state_dir / "nodes" / node),
            "--resize-delay",
            str(self.resize_delay),
            "--vmm-socket-root",
            str(self.socket_root(node)),
        ]
        vmm_command = spec.vmm_command or self.vmm_command
        if vmm_command:
            args += ["--vmm-command", vmm_command]
        if self.cluster_controllers:
            args += ["--no-bind", "--node-labels", f"{STACK_LABEL}={self.stack_id}"]
        name = f"kubelet-{node}"
        self.children[name] = Child(
            name, python_module("testbed.kubelet.main", *args), self.logs / f"{name}.log"
        )
        self.start_daemon(node)

    def _start_webhook(self) -> None:
        from adapters.webhook.certs import write_serving_cert
        from apps.webhook.main import register_webhooks

        certs = self.state_dir / "webhook"
        bundle = write_serving_cert(certs, dns_names=["localhost"], ips=["127.0.0.1"])
        port = free_port()
        self.children["webhook"] = Child(
            "webhook",
            python_module(
                "apps.webhook.main",
                "serve",
                "--cert",
                str(certs / "tls.crt"),
                "--key",
                str(certs / "tls.key"),
                "--port",
                str(port),
                "--kubeconfig",
                str(self.component_kubeconfig("webhook")),
                "--log-level",
                os.environ.get("CHSCALE_WEBHOOK_LOG_LEVEL", "info"),
            ),
            self.logs / "webhook.log",
        )
        self._wait_port(port, "webhook")
        assert self.control_plane is not None
        # Registering is the installer's act (an admin's), not the webhook's: its own
        # account only reads VMs.
        register_webhooks(self.control_plane.api_client(), f"https://127.0.0.1:{port}", bundle)
        self._webhook_registered = True

    def _wait_port(self, port: int, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            child = self.children.get(name)
            if child is not None and not child.alive():
                raise StackError(f"{name} exited:\n{child.log_tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise StackError(f"{name} did not listen on port {port} within {timeout}s")

    def _wait_nodes_ready(self, timeout: float = 60.0) -> None:
        from adapters.k8s.client import Kube, NotFound

        assert self.control_plane is not None
        kube = Kube(self.control_plane.api_client())
        deadline = time.monotonic() + timeout
        pending = set(self.nodes)
        while pending and time.monotonic() < deadline:
            real = [c for n in self.real_nodes.values() for c in n.children.values()]
            for child in [*self.children.values(), *real]:
                if not child.alive():
                    raise StackError(f"{child.name} exited:\n{child.log_tail()}")
            for node in list(pending):
                try:
                    obj = kube.get(f"/api/v1/nodes/{node}")
                except NotFound:
                    continue
                if self._adopted(obj):
                    pending.discard(node)
            time.sleep(0.1)
        if pending:
            raise StackError(f"nodes not ready after {timeout}s: {sorted(pending)}")
        if not self._own_control_plane:
            for node in self.real_nodes:
                self._lift_not_ready_taint(kube, node)

    def _adopted(self, node: dict[str, Any]) -> bool:
        """Ready, and (when the stack's own scheduler places pods) labelled as this
        stack's. Ready alone is not enough: a test may register a bare Ready Node before
        the stack starts (ControlPlane.add_node), and until this stack's kubelet has
        adopted it the scheduler's added affinity excludes it (in CI a VM pod tried that
        early stayed Pending through a test's whole 120 s)."""
        conditions = (node.get("status") or {}).get("conditions") or []
        if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return False
        if not self.cluster_controllers:
            return True  # the simulated kubelet binds its own pods: nothing to race
        labels = (node.get("metadata") or {}).get("labels") or {}
        return labels.get(STACK_LABEL) == self.stack_id

    def _lift_not_ready_taint(self, kube: Any, node: str) -> None:
        # The node lifecycle controller lifts it once the node is Ready; a shared control
        # plane runs without that controller (WITHOUT_NODE_LIFECYCLE), so the stack does
        # its part for the real nodes it started.
        obj = kube.get(f"/api/v1/nodes/{node}")
        taints = (obj.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != NOT_READY_TAINT]
        if len(kept) != len(taints):
            kube.patch(f"/api/v1/nodes/{node}", {"spec": {"taints": kept or None}})

    def _write_state(self) -> None:
        state: dict[str, Any] = {
            "kubeconfig": str(self.kubeconfig),
            "nodes": self.nodes,
            "processes": {
                **{name: child.pid for name, child in self.children.items()},
                **{
                    f"{child.name}-{node}": child.pid
                    for node, real in self.real_nodes.items()
                    for child in real.children.values()
                },
            },
            "kubelet": self.kubelet,
            "supervisor": os.getpid(),
        }
        if self.control_plane is not None:
            state["controlplane"] = {"server": self.control_plane.server_url}
        (self.state_dir / "stack.json").write_text(json.dumps(state, indent=2))

    # --- stop ---------------------------------------------------------------------------

    def stop(self) -> None:
        # Order: our processes first (controller before kubelets, so it does not react
        # to pods vanishing), then the control plane.
        if self._webhook_registered and self.control_plane is not None:
            from apps.webhook.main import unregister_webhooks

            # failurePolicy is Fail: a registration left behind would block every VM write.
            unregister_webhooks(self.control_plane.api_client())
            self._webhook_registered = False
        # The cluster's controllers first too: the controller-manager would otherwise
        # garbage-collect and the scheduler re-place what the stopping kubelets leave.
        def order(name: str) -> tuple[bool, bool, str]:
            return (not name.startswith("kube-"), not name.startswith("controller"), name)

        for name in sorted(self.children, key=order):
            self.children[name].stop()
        self.children.clear()
        for real in self.real_nodes.values():
            real.stop()
        self.real_nodes.clear()
        if self.control_plane is not None and self._own_control_plane:
            self.control_plane.stop()
            self.control_plane = None
        state = self.state_dir / "stack.json"
        if state.exists():
            state.unlink()
        if self._socket_root is not None:
            # A kubelet that was SIGKILLed (by a fault schedule, or at the end of its grace)
            # leaves its VMMs running detached, as containers outlive a real kubelet.
            orphans = end_processes_mentioning(f"path={self._socket_root}/")
            if orphans:
                log.warning(
                    "stopped VMM processes left by their kubelets", extra={"count": orphans}
                )
            shutil.rmtree(self._socket_root, ignore_errors=True)
            self._socket_root = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
