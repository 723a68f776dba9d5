"""Malformed VirtualMachines written straight to the API server, webhook off.

Admission is the first line of defence; the controller is the last (README, "Admission":
"anything that slipped past admission" gets ``SpecValid=False``, never a crash). This
module writes seeded, deliberately broken specs (wrong types, negative and zero
numbers, huge quantities, missing fields, odd unicode) and checks that:

- the controller process stays alive (same pid) and logs no failed reconcile;
- every object the kernel must refuse gets ``SpecValid=False`` (``expect="invalid"``);
  objects that may be fine get *some* answer (a phase or a condition);
- a running VM whose spec is broken by an update keeps running and is flagged, and a
  pool VM still resizes to convergence while all this goes on.

Objects the CRD's structural schema refuses (a string where an integer goes) never
reach the controller; they are counted, not failures.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen

from adapters.k8s.client import ApiError, NotFound
from adapters.k8s.vms import vm_path
from core.constants import API_GROUP, API_VERSION, KIND

if TYPE_CHECKING:
    from testbed.faults.runner import Harness

SPEC_VALID = "SpecValid"
NOWHERE = "fuzz-nowhere"  # a node that does not exist: valid fuzz VMs stay Scheduling
ANSWER_TIMEOUT_S = 20.0
FAILED_RECONCILE = "reconcile failed"


@frozen
class FuzzCase:
    name: str
    spec: Any
    expect: str  # "invalid": must get SpecValid=False; "any": must get some answer
    why: str


@define
class FuzzResult:
    written: int = 0
    rejected: int = 0  # refused by the CRD schema: never reached the controller
    flagged: int = 0  # got SpecValid=False
    failures: list[str] = field(factory=list)


def _base() -> dict[str, Any]:
    return {
        "instance": {"cpu": {"sockets": 1, "coresPerSocket": 2}, "memory": {"size": "1Gi"}},
        "nodeSelector": {"kubernetes.io/hostname": NOWHERE},
    }


def _with(path: tuple[str, ...], value: Any, delete: bool = False) -> dict[str, Any]:
    spec = _base()
    node: Any = spec
    for key in path[:-1]:
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return spec


CPU, MEM = ("instance", "cpu"), ("instance", "memory")
ODD_MEMORY = (
    "\uff11Gi",  # fullwidth digit one
    "1Gi\u200b",  # zero-width space
    "\u202e1Gi",  # right-to-left override
    "1 Gi",
    "1gi",
    "\u2153Gi",  # vulgar fraction one third
    "\U0001f418",  # an elephant
    "",
    "Gi",
    "1Gi\x00",
    "0x40000000",
    "1e3Mi",
    "NaN",
    "Infinity",
    "--1Gi",
    "1" * 5000,
)
HUGE_MEMORY = ("1e30", "99999999999Ei", "9223372036854775807", "8Ei", "1e19")
BAD_CPU_NUMBERS = (0, -1, -(2**31), -(2**63))


def _catalogue(rng: random.Random) -> list[tuple[dict[str, Any] | Any, str, str]]:
    """(spec, expect, why) for every kind of breakage; :func:`cases` samples from it."""
    out: list[tuple[Any, str, str]] = []
    for value in BAD_CPU_NUMBERS:
        out.append((_with((*CPU, "sockets"), value), "invalid", f"sockets={value}"))
        out.append((_with((*CPU, "coresPerSocket"), value), "invalid", f"coresPerSocket={value}"))
        out.append((_with((*CPU, "maxVcpus"), value), "invalid", f"maxVcpus={value}"))
    out.append((_with((*CPU, "maxVcpus"), 1), "invalid", "maxVcpus below sockets x cores"))
    out.append((_with((*CPU, "sockets"), 2**40), "any", "sockets=2^40"))
    out.append((_with((*CPU, "sockets"), 2**62), "any", "sockets=2^62"))
    out.append((_with((*CPU, "sockets"), "two"), "any", "sockets as a string"))
    out.append((_with((*CPU, "sockets"), 1.5), "any", "sockets as a float"))
    out.append((_with((*CPU, "sockets"), True), "any", "sockets as a boolean"))
    out.append((_with((*CPU, "sockets"), None), "any", "sockets null"))
    out.append((_with(CPU, "lots"), "any", "cpu as a string"))
    out.append((_with(CPU, [1, 2]), "any", "cpu as a list"))
    for value in ODD_MEMORY:
        out.append((_with((*MEM, "size"), value), "invalid", f"memory.size={value[:20]!r}"))
    for value in HUGE_MEMORY:
        out.append((_with((*MEM, "size"), value), "invalid", f"memory.size={value}"))
    for value in ("-1Gi", "0", "0Gi", "-0.5Gi", "1G", "1001Mi", "1", "3.3Mi"):
        out.append((_with((*MEM, "size"), value), "invalid", f"memory.size={value}"))
    out.append((_with((*MEM, "size"), -(2**30)), "invalid", "memory.size as a negative int"))
    out.append((_with((*MEM, "size"), 2**30), "any", "memory.size as an integer"))
    out.append((_with((*MEM, "size"), 1.5), "any", "memory.size as a float"))
    out.append((_with((*MEM, "size"), {"a": 1}), "any", "memory.size as an object"))
    out.append((_with((*MEM, "maxSize"), "512Mi"), "invalid", "maxSize below size"))
    out.append((_with((*MEM, "maxSize"), "-1"), "invalid", "negative maxSize"))
    out.append((_with((*MEM, "maxSize"), "\u00bd"), "invalid", "maxSize one half sign"))
    # A missing size, memory, instance or spec gets ch-vmm's defaults (1 vCPU, 1Gi; ADR 0013).
    out.append((_with((*MEM, "size"), None, delete=True), "any", "memory.size missing"))
    out.append((_with(MEM, None, delete=True), "any", "memory missing"))
    out.append((_with(CPU, None, delete=True), "any", "cpu missing (defaults apply)"))
    out.append((_with(("instance",), None, delete=True), "any", "instance missing"))
    out.append((_with(("instance",), "vm"), "any", "instance as a string"))
    out.append(({}, "any", "empty spec"))
    out.append((None, "invalid", "no spec at all"))
    out.append(
        (_with(("instance", "\u2603"), {"\U0001f47b": "\u0000"}), "any", "unicode unknown field")
    )
    # A few random combinations of the above breakages.
    for _ in range(6):
        spec = _base()
        spec["instance"]["cpu"]["sockets"] = rng.choice([*BAD_CPU_NUMBERS, 1, 3])
        spec["instance"]["memory"]["size"] = rng.choice([*ODD_MEMORY, *HUGE_MEMORY, "2Gi"])
        bad = spec["instance"]["cpu"]["sockets"] < 1 or spec["instance"]["memory"]["size"] != "2Gi"
        out.append((spec, "invalid" if bad else "any", "combined breakage"))
    return out


def cases(seed: int, count: int) -> list[FuzzCase]:
    """``count`` cases drawn (without repeats while they last) from the catalogue."""
    rng = random.Random(seed)
    catalogue = _catalogue(rng)
    order = list(range(len(catalogue)))
    rng.shuffle(order)
    picked = [order[i % len(order)] for i in range(count)]
    return [
        FuzzCase(f"fuzz-{seed}-{i}", catalogue[j][0], catalogue[j][1], catalogue[j][2])
        for i, j in enumerate(picked)
    ]


def spec_valid(obj: dict[str, Any]) -> str | None:
    """The SpecValid condition's status ("True"/"False"), or None."""
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if isinstance(cond, dict) and cond.get("type") == SPEC_VALID:
            return str(cond.get("status"))
    return None


def run_fuzz(harness: Harness, count: int, seed: int = 0) -> FuzzResult:
    """Write ``count`` malformed VMs into the harness's namespace and judge the answers."""
    stack, kube, namespace = harness._stack(), harness._kube(), harness.namespace
    result = FuzzResult()
    controller = stack.children["controller-0"]
    pid = controller.pid
    log_path = stack.logs / "controller-0.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    written: list[FuzzCase] = []
    for case in cases(seed, count):
        body: dict[str, Any] = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {"name": case.name, "namespace": namespace},
        }
        if case.spec is not None:
            body["spec"] = case.spec
        try:
            kube.create(vm_path(namespace), body)
        except ApiError as exc:
            if exc.status in (400, 422):
                result.rejected += 1
                continue
            raise
        result.written += 1
        written.append(case)
    # A running VM whose spec breaks on update: flagged, still running, then repaired.
    pool_vm = harness.pool.vms[0].name
    kube.patch(
        vm_path(namespace, pool_vm), {"spec": {"instance": {"memory": {"size": "\u2153Gi"}}}}
    )
    _wait(
        lambda: spec_valid(kube.get(vm_path(namespace, pool_vm))) == "False",
        result,
        f"{pool_vm}: a running VM's broken spec was not flagged SpecValid=False",
    )
    running = (kube.get(vm_path(namespace, pool_vm)).get("status") or {}).get("phase")
    if running not in ("Running", "Paused"):
        result.failures.append(f"{pool_vm}: phase {running} after its spec broke (want Running)")
    # Meanwhile the pool still converges: repair and resize, then judge every fuzz VM.
    vm = harness.pool.vms[1]
    kube.patch(vm_path(namespace, pool_vm), {"spec": {"instance": {"memory": {"size": "1Gi"}}}})
    harness._resize(vm.name, vm.max_vcpus, vm.boot_memory * 2)
    pending = harness.wait_converged(ANSWER_TIMEOUT_S * 2)
    for name, why in pending.items():
        result.failures.append(f"pool VM {name} did not converge during fuzzing: {why}")
    for case in written:
        _judge(harness, case, result)
    if not controller.alive() or stack.children["controller-0"].pid != pid:
        result.failures.append(f"the controller died during fuzzing:\n{controller.failure()}")
    text = log_path.read_bytes()[log_start:].decode(errors="replace")
    failed = [line for line in text.splitlines() if FAILED_RECONCILE in line]
    if failed:
        result.failures.append(
            f"{len(failed)} failed reconciles in the controller log, first: {failed[0][:500]}"
        )
    _cleanup(harness, written)
    return result


def _judge(harness: Harness, case: FuzzCase, result: FuzzResult) -> None:
    kube, namespace = harness._kube(), harness.namespace
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        obj = kube.get(vm_path(namespace, case.name))
        valid = spec_valid(obj)
        phase = (obj.get("status") or {}).get("phase")
        if valid == "False":
            result.flagged += 1
            return
        if case.expect == "any" and phase is not None:
            return
        if time.monotonic() > deadline:
            got = f"phase={phase} SpecValid={valid}"
            result.failures.append(
                f"{case.name} ({case.why}, expected {case.expect}): no answer in "
                f"{ANSWER_TIMEOUT_S:.0f}s, {got}; spec={str(obj.get('spec'))[:200]}"
            )
            return
        time.sleep(0.1)


def _wait(done: Callable[[], bool], result: FuzzResult, failure: str) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            result.failures.append(failure)
            return
        time.sleep(0.1)


def _cleanup(harness: Harness, written: list[FuzzCase]) -> None:
    kube, namespace = harness._kube(), harness.namespace
    for case in written:
        kube.delete(vm_path(namespace, case.name))
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    for case in written:
        while time.monotonic() < deadline:
            try:
                kube.get(vm_path(namespace, case.name))
            except NotFound:
                break
            time.sleep(0.1)
