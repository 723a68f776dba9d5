"""The fault harness: one local stack behind fault proxies, a pool of VMs, and the loop
that plays schedules (:mod:`testbed.faults.schedule`) while the checker watches.

:class:`Harness` starts (or joins) a control plane, puts an :class:`ApiProxy` in front
of the API server for the controller and for each node's daemon, starts the stack with
those kubeconfigs (webhook off, so malformed objects reach the controller), creates the
pool's VMs and starts the :class:`Checker`. :meth:`Harness.run` plays one schedule:

1. bring every VM to the schedule's start sizes, fault-free, and wait for convergence;
2. play the timeline: spec changes and fault starts/ends at their offsets;
3. end every fault (proxies cleared, VMMs answering, sockets back, killed processes
   running again) and wait, bounded, for every VM to converge (invariant 4);
4. collect violations, bound the pod resize requests per VM (invariant 5) and check
   that nothing crashed on its own.

One stack serves every schedule: each starts from sizes of its own, so a schedule's
outcome does not depend on the ones before it, and ``--replay SEED`` replays it alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import define, field

from adapters.k8s.client import ApiError, Kube, NotFound
from adapters.k8s.vms import vm_path
from apps.common.logs import kv
from core.constants import API_GROUP, API_VERSION, KIND
from core.podlayout import vmm_socket_path
from core.quantity import format_bytes
from testbed.controlplane.launcher import ControlPlane
from testbed.faults.checker import Checker, Trigger, Violation
from testbed.faults.proxy import ApiProxy
from testbed.faults.schedule import (
    CONTROLLER,
    DAEMON_PREFIX,
    CallClass,
    Fault,
    FaultKind,
    GeneratorConfig,
    Pool,
    Schedule,
    default_pool,
    generate,
)
from testbed.localstack.stack import NodeSpec, Stack

log = logging.getLogger("chscale.faults")

HOSTNAME = "kubernetes.io/hostname"
CONVERGE_TIMEOUT_S = 45.0
RESET_TIMEOUT_S = 60.0
POLL_S = 0.1
RESIZE_DELAY_S = 0.05
# The guest (un)plugs memory at 8 GiB/s and ejects vCPUs after 0.2 s: fast, but every
# phase stays visible to the checker and a vCPU shrink meets Cloud Hypervisor's 429.
VMM_FLAGS = ("--sim-plug-rate", "8G", "--sim-eject-delay", "0.2")
# Pod resize requests one spec change may need: grow, shrink (or grow, restore after
# Infeasible); anything far beyond this per change and fault is a loop (invariant 5).
RESIZES_PER_CHANGE = 2
RESIZES_PER_FAULT = 2
SOCKET_AWAY_SUFFIX = ".away"


@define
class ScheduleResult:
    seed: int
    replay: str
    faults_injected: int = 0
    violations: list[Violation] = field(factory=list)
    unconverged: dict[str, str] = field(factory=dict)
    converge_s: float = 0.0
    reset_s: float = 0.0
    pod_resizes: dict[str, int] = field(factory=dict)
    notes: list[str] = field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.unconverged

    def report(self) -> str:
        lines = [f"schedule seed={self.seed} FAILED; replay: {self.replay}"]
        lines += [f"  violation: {v}" for v in self.violations]
        lines += [f"  unconverged {vm}: {why}" for vm, why in self.unconverged.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def vm_object(
    namespace: str, name: str, node: str, vcpus: int, memory: int, max_vcpus: int, max_memory: int
) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "instance": {
                "cpu": {"sockets": 1, "coresPerSocket": vcpus, "maxVcpus": max_vcpus},
                "memory": {"size": format_bytes(memory), "maxSize": format_bytes(max_memory)},
            },
            "nodeSelector": {HOSTNAME: node},
        },
    }


def size_patch(vcpus: int, memory: int) -> dict[str, Any]:
    return {
        "spec": {
            "instance": {
                "cpu": {"sockets": 1, "coresPerSocket": vcpus},
                "memory": {"size": format_bytes(memory)},
            }
        }
    }


def find_vmm_pid(socket: str) -> int | None:
    """The VMM serving ``socket``: the process whose command line names exactly it."""
    wanted = f"path={socket}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            return int(entry)
    return None


class Harness:
    def __init__(
        self,
        state_dir: Path,
        *,
        control_plane: ControlPlane | None = None,
        pool: Pool | None = None,
        generator: GeneratorConfig | None = None,
        converge_timeout: float = CONVERGE_TIMEOUT_S,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.pool = pool or default_pool()
        self.generator = generator or GeneratorConfig()
        self.converge_timeout = converge_timeout
        self.progress = progress or (lambda _msg: None)
        self.control_plane = control_plane
        self._own_control_plane = control_plane is None
        self.proxies: dict[str, ApiProxy] = {}
        self.stack: Stack | None = None
        self.kube: Kube | None = None
        self.checker: Checker | None = None
        self.namespace = f"faults-{uuid.uuid4().hex[:6]}"
        self.faults_injected = 0
        self.schedules = 0
        # Restarts run on one thread that lives as long as the harness: a child dies with
        # the thread that forked it (PR_SET_PDEATHSIG, testbed.procs).
        self._restarts: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._restarter: threading.Thread | None = None
        self._restart_lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._restarter = threading.Thread(target=self._restart_loop, name="restarter", daemon=True)
        self._restarter.start()
        if self.control_plane is None:
            self.progress("starting etcd and kube-apiserver")
            self.control_plane = ControlPlane(self.state_dir / "controlplane")
            self.control_plane.start()
        cp = self.control_plane
        upstream = cp.kubeconfig_path
        kubeconfigs: dict[str, Path] = {}
        for component in [CONTROLLER, *(f"{DAEMON_PREFIX}{n.name}" for n in self.pool.nodes)]:
            proxy = ApiProxy(component, upstream)
            proxy.start()
            self.proxies[component] = proxy
            name = self._child_name(component)
            kubeconfigs[name] = proxy.write_kubeconfig(self.state_dir / f"{name}.kubeconfig")
        nodes = [
            NodeSpec(
                n.name, str(n.cpu), format_bytes(n.memory), self._vmm_command(n.vmm_error_rate)
            )
            for n in self.pool.nodes
        ]
        self.progress(f"starting the stack ({len(nodes)} nodes, proxies in front of the API)")
        self.stack = Stack(
            self.state_dir / "stack",
            nodes=nodes,
            control_plane=cp,
            resize_delay=RESIZE_DELAY_S,
            webhook=False,  # malformed objects must reach the controller (fuzzing)
            kubeconfigs=kubeconfigs,
        )
        self.stack.start()
        self.kube = Kube(cp.api_client())
        cp.create_namespace(self.namespace)
        self.progress(f"creating {len(self.pool.vms)} VMs in namespace {self.namespace}")
        for vm in self.pool.vms:
            self.kube.create(
                vm_path(self.namespace),
                vm_object(
                    self.namespace,
                    vm.name,
                    vm.node,
                    vm.boot_vcpus,
                    vm.boot_memory,
                    vm.max_vcpus,
                    vm.max_memory,
                ),
            )
        self.checker = Checker(
            self.kube,
            self.namespace,
            [vm.name for vm in self.pool.vms],
            lambda node: str(self._stack().socket_root(node)),
        )
        self.checker.start()
        pending = self.wait_converged(RESET_TIMEOUT_S)
        if pending:
            raise RuntimeError(f"the pool's VMs did not start: {pending}")

    def _vmm_command(self, error_rate: float) -> str:
        argv = [sys.executable, "-m", "testbed.chsim.main", *VMM_FLAGS]
        if error_rate:
            argv += ["--sim-error-rate", str(error_rate), "--sim-error-seed", "7"]
        return shlex.join(argv)

    def stop(self) -> None:
        if self._restarter is not None:
            self._restarts.join()
            self._restarts.put(None)
            self._restarter.join(timeout=10)
            self._restarter = None
        if self.checker is not None:
            self.checker.stop()
            self.checker = None
        if self.kube is not None and self.stack is not None:
            self._delete_pool()
        if self.stack is not None:
            self.stack.stop()
            self.stack = None
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()
        if self.control_plane is not None:
            if self._own_control_plane:
                self.control_plane.stop()
            else:
                with contextlib.suppress(Exception):
                    self.control_plane.delete_namespace(self.namespace)
            self.control_plane = None

    def _delete_pool(self) -> None:
        assert self.kube is not None
        for proxy in self.proxies.values():
            proxy.clear()
        with contextlib.suppress(ApiError):
            for item in self.kube.get(vm_path(self.namespace)).get("items") or ():
                self.kube.delete(vm_path(self.namespace, item["metadata"]["name"]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if not self.kube.get(vm_path(self.namespace)).get("items"):
                    return
            except ApiError:
                return
            time.sleep(0.2)

    def __enter__(self) -> Harness:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _stack(self) -> Stack:
        assert self.stack is not None, "harness not started"
        return self.stack

    def _kube(self) -> Kube:
        assert self.kube is not None, "harness not started"
        return self.kube

    def _checker(self) -> Checker:
        assert self.checker is not None, "harness not started"
        return self.checker

    @staticmethod
    def _child_name(component: str) -> str:
        if component == CONTROLLER:
            return "controller-0"
        return f"daemon-{component.removeprefix(DAEMON_PREFIX)}"

    # --- one schedule -------------------------------------------------------------------

    def schedule(self, seed: int) -> Schedule:
        return generate(seed, self.pool, self.generator)

    def run(self, schedule: Schedule) -> ScheduleResult:
        checker = self._checker()
        result = ScheduleResult(schedule.seed, schedule.replay_command)
        checker.seed = schedule.seed
        checker.take_transitions()
        log.info("schedule", extra=kv(seed=schedule.seed, plan=schedule.describe()))
        # 1. the start sizes, fault-free
        reset_began = time.monotonic()
        for start in schedule.starts:
            self._resize(start.vm, start.vcpus, start.memory)
        pending = self.wait_converged(RESET_TIMEOUT_S)
        result.reset_s = time.monotonic() - reset_began
        if pending:
            result.unconverged.update({vm: f"before faults: {why}" for vm, why in pending.items()})
            result.violations += checker.take_violations()
            return result
        resizes_before = self._pod_resizes()
        # 2. the timeline
        started = time.monotonic()
        try:
            result.faults_injected = self._play(schedule, started)
        finally:
            # 3. every fault ends, whatever happened above
            self._end_faults()
        t0 = time.monotonic()
        pending = self.wait_converged(self.converge_timeout)
        result.converge_s = time.monotonic() - t0
        result.unconverged.update(pending)
        for vm in pending:
            result.notes.append(
                f"last status writes of {vm}:\n    " + "\n    ".join(checker.history(vm))
            )
        # 4. the rest of the verdict
        resizes = self._pod_resizes()
        for vm in self.pool.vms:
            made = resizes.get(vm.name, 0) - resizes_before.get(vm.name, 0)
            result.pod_resizes[vm.name] = made
            changes = sum(1 for c in schedule.changes if c.vm == vm.name)
            bound = RESIZES_PER_CHANGE * (changes + 1) + RESIZES_PER_FAULT * len(schedule.faults)
            checker.count()
            if made > bound:
                checker.violate(
                    "5",
                    vm.name,
                    f"{made} pod resize requests for {changes} spec changes "
                    f"and {len(schedule.faults)} faults (bound {bound})",
                )
        result.violations += checker.take_violations()
        self.faults_injected += result.faults_injected
        self.schedules += 1
        return result

    def _play(self, schedule: Schedule, started: float) -> int:
        timeline: list[tuple[float, int, Callable[[], None]]] = []
        for change in schedule.changes:
            timeline.append((change.at, 0, lambda c=change: self._resize(c.vm, c.vcpus, c.memory)))
        effects: list[Callable[[], bool]] = []
        for fault in schedule.faults:
            begin, end, took = self._fault_actions(fault, schedule.seed)
            timeline.append((fault.at, 1, begin))
            if end is not None:
                timeline.append((fault.ends, 2, end))
            effects.append(took)
        timeline.sort(key=lambda item: (item[0], item[1]))
        for at, _, action in timeline:
            delay = started + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                action()
            except (ApiError, OSError) as exc:
                log.warning("schedule step failed", extra=kv(seed=schedule.seed, error=str(exc)))
        rest = started + schedule.window - time.monotonic()
        if rest > 0:
            time.sleep(rest)
        return sum(1 for took in effects if took())

    def _fault_actions(
        self, fault: Fault, seed: int
    ) -> tuple[Callable[[], None], Callable[[], None] | None, Callable[[], bool]]:
        """(start, end or None, did it take effect?) for one fault."""
        kind = fault.kind
        always: Callable[[], bool] = lambda: True  # noqa: E731
        if kind is FaultKind.KILL:
            return (lambda: self._kill_and_restart(fault.target, fault.duration)), None, always
        if kind is FaultKind.KILL_AT_PHASE:
            trigger = Trigger(
                fault.vm, fault.phase, lambda: self._kill_and_restart(fault.target, fault.duration)
            )
            return (lambda: self._checker().arm(trigger)), None, trigger.fired.is_set
        proxy = self.proxies.get(fault.target)
        if kind in (FaultKind.API_ERROR, FaultKind.API_TIMEOUT):
            assert proxy is not None
            before = dict(proxy.injected)
            prefix = f"{fault.call}:"

            def took() -> bool:
                assert proxy is not None
                return any(
                    n > before.get(k, 0) for k, n in proxy.injected.items() if k.startswith(prefix)
                )

            call = CallClass(fault.call)

            def start() -> None:
                assert proxy is not None
                if kind is FaultKind.API_ERROR:
                    proxy.fail_next(call, fault.status, fault.count)
                else:
                    proxy.hang_next(call, fault.count, fault.duration, fault.after_upstream)
                if call in (CallClass.LIST, CallClass.WATCH):
                    # Informers list and open watches only now and then: cut the open
                    # watches so that the fault meets the reconnect it is aimed at.
                    proxy.drop_watches()

            return start, None, took
        if kind in (FaultKind.WATCH_DELAY, FaultKind.WATCH_DUPLICATE, FaultKind.WATCH_REORDER):
            assert proxy is not None
            return (
                lambda: proxy.set_watch_faults(
                    fault.duration,
                    delay=fault.delay,
                    duplicate=kind is FaultKind.WATCH_DUPLICATE,
                    reorder=kind is FaultKind.WATCH_REORDER,
                ),
                None,
                always,
            )
        if kind is FaultKind.WATCH_DROP:
            assert proxy is not None
            return proxy.drop_watches, None, always
        if kind is FaultKind.VMM_HANG:
            hung: list[int] = []
            return (
                lambda: self._hang(fault.target, hung),
                lambda: self._unhang(hung),
                lambda: bool(hung),
            )
        if kind is FaultKind.VMM_SOCKET_GONE:
            moved: list[str] = []
            return (
                lambda: self._socket_away(fault.target, moved),
                lambda: self._socket_back(moved),
                lambda: bool(moved),
            )
        if kind is FaultKind.NODE_SQUEEZE:
            name = f"squeeze-{fault.target}-{seed}"
            return (
                lambda: self._squeeze(name, fault.target, fault.memory),
                lambda: self._unsqueeze(name),
                always,
            )
        raise AssertionError(f"unhandled fault kind {kind}")

    # --- actions ------------------------------------------------------------------------

    def _resize(self, vm: str, vcpus: int, memory: int) -> None:
        self._kube().patch(vm_path(self.namespace, vm), size_patch(vcpus, memory))

    def _kill_and_restart(self, component: str, after: float) -> None:
        """SIGKILL now; start again ``after`` s later, off the caller's thread (a phase
        trigger fires on the checker's watch thread)."""
        stack = self._stack()
        name = self._child_name(component)
        with self._restart_lock:
            child = stack.children.get(name)
            if child is None or not child.alive():
                return
            child.kill()
        log.info("killed", extra=kv(component=name, restart_after=after))
        self._restarts.put((time.monotonic() + after, name))

    def _restart_loop(self) -> None:
        while True:
            item = self._restarts.get()
            try:
                if item is None:
                    return
                due, name = item
                time.sleep(max(0.0, due - time.monotonic()))
                self._ensure_running(name)
            except Exception:
                log.exception("restart failed", extra=kv(item=str(item)))
            finally:
                self._restarts.task_done()

    def _ensure_running(self, name: str) -> None:
        stack = self._stack()
        with self._restart_lock:
            child = stack.children.get(name)
            if child is not None and child.alive():
                return
            if name.startswith("controller-"):
                stack.start_controller(int(name.removeprefix("controller-")))
            else:
                stack.start_daemon(name.removeprefix("daemon-"))

    def _vmm_socket(self, vm: str) -> str | None:
        try:
            pod = self._kube().get(f"/api/v1/namespaces/{self.namespace}/pods/vm-{vm}")
        except NotFound:
            return None
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            return None
        return vmm_socket_path(str(self._stack().socket_root(node)), pod["metadata"]["uid"])

    def _hang(self, vm: str, hung: list[int]) -> None:
        socket = self._vmm_socket(vm)
        pid = find_vmm_pid(socket) if socket else None
        if pid is not None:
            os.kill(pid, signal.SIGUSR1)
            hung.append(pid)

    def _unhang(self, hung: list[int]) -> None:
        while hung:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung.pop(), signal.SIGUSR1)

    def _socket_away(self, vm: str, moved: list[str]) -> None:
        socket = self._vmm_socket(vm)
        if socket and os.path.exists(socket):
            os.rename(socket, socket + SOCKET_AWAY_SUFFIX)
            moved.append(socket)

    def _socket_back(self, moved: list[str]) -> None:
        while moved:
            socket = moved.pop()
            with contextlib.suppress(FileNotFoundError):
                os.rename(socket + SOCKET_AWAY_SUFFIX, socket)

    def _squeeze(self, name: str, node: str, memory: int) -> None:
        resources = {"cpu": "100m", "memory": format_bytes(memory)}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "nodeSelector": {HOSTNAME: node},
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "squeeze",
                        "image": "registry.k8s.io/pause:3.10",
                        "resources": {"requests": resources, "limits": resources},
                    }
                ],
            },
        }
        self._kube().create(f"/api/v1/namespaces/{self.namespace}/pods", pod)

    def _unsqueeze(self, name: str) -> None:
        self._kube().delete(
            f"/api/v1/namespaces/{self.namespace}/pods/{name}", grace_period_seconds=0
        )

    def _end_faults(self) -> None:
        """Back to a healthy world: the schedule's own end actions ran already; this
        catches what a fault left behind (a restart still sleeping, a proxy rule)."""
        checker = self._checker()
        checker.disarm()
        for proxy in self.proxies.values():
            proxy.clear()
        self._restarts.join()
        # Every process the schedule killed runs again by now: one that does not, or any
        # other that is gone (a kubelet), exited by itself.
        for name, child in list(self._stack().children.items()):
            if not child.alive():
                checker.violate("crash", name, child.failure())
        for name in [self._child_name(c) for c in self.proxies]:
            self._restarts.put((0.0, name))
        self._restarts.join()

    # --- observations -------------------------------------------------------------------

    def wait_converged(self, timeout: float) -> dict[str, str]:
        """{vm: what is off} for the VMs that did not converge within ``timeout``."""
        checker = self._checker()
        deadline = time.monotonic() + timeout
        pending = {vm.name: "not checked yet" for vm in self.pool.vms}
        while pending:
            for vm in list(pending):
                why = checker.converged(vm)
                if why is None:
                    del pending[vm]
                else:
                    pending[vm] = why
            if not pending or time.monotonic() > deadline:
                break
            log.debug("waiting for convergence", extra=kv(pending=str(pending)))
            time.sleep(POLL_S)
        checker.count(len(self.pool.vms))
        return pending

    def _pod_resizes(self) -> dict[str, int]:
        counts = self.proxies[CONTROLLER].pod_resizes
        prefix = f"{self.namespace}/vm-"
        return {k.removeprefix(prefix): n for k, n in counts.items() if k.startswith(prefix)}

    def proxy_interventions(self) -> int:
        return sum(p.injected_total() for p in self.proxies.values())

    def checks(self) -> int:
        return self._checker().checks
