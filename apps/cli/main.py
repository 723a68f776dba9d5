"""chscale: run the local stack, resize VMs, watch the demo.

chscale up --state-dir DIR [--nodes N] [--node-cpu C] [--node-memory Q]
chscale status --state-dir DIR
chscale down --state-dir DIR
chscale resize NAME --cpus N --memory Q [--wait] (--kubeconfig K | --state-dir DIR)
chscale demo
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from adapters.k8s.client import ApiError, Kube, load_api_client
from apps.cli.progress import Progress
from apps.cli.vmops import Follower, converged, memory_arg, resize_refused, resize_vm, summary

DEFAULT_STATE = Path(os.environ.get("CHSCALE_STATE_DIR", ".chscale"))


def _kube(args: argparse.Namespace) -> Kube:
    kubeconfig = args.kubeconfig or str(Path(args.state_dir) / "kubeconfig")
    return Kube(load_api_client(kubeconfig))


# --- up / down / status ---------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    if (state / "stack.json").exists() and _supervisor_alive(state):
        print(f"a stack already runs in {state}; `chscale down --state-dir {state}` first")
        return 1
    state.mkdir(parents=True, exist_ok=True)
    for stale in ("ready", "failed"):
        (state / stale).unlink(missing_ok=True)
    progress = Progress()
    progress.step("building the control plane (first run only)")
    from testbed.controlplane.build import ensure_binaries

    ensure_binaries()
    kubelet = _choose_kubelet(args.kubelet)
    progress.step("starting the stack")
    argv = [
        sys.executable,
        "-m",
        "testbed.localstack.supervisor",
        "--state-dir",
        str(state),
        "--nodes",
        str(args.nodes),
        "--node-cpu",
        args.node_cpu,
        "--node-memory",
        args.node_memory,
    ]
    if args.vmm_command:
        argv += ["--vmm-command", args.vmm_command]
    if args.kernel:
        argv += ["--kernel", args.kernel]
    argv += ["--kubelet", kubelet]
    with open(state / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; `chscale down` stops it
        )
    (state / "supervisor.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if (state / "ready").exists():
            progress.done(f"stack ready in {state}")
            print(f"\n  export KUBECONFIG={state / 'kubeconfig'}")
            print("  kubectl apply -f examples/vm.yaml")
            print("  kubectl get vm")
            print(f"  chscale resize my-vm --cpus 12 --memory 8Gi --wait --state-dir {state}")
            print(f"  chscale down --state-dir {state}\n")
            return 0
        if proc.poll() is not None or (state / "failed").exists():
            print((state / "supervisor.log").read_text()[-3000:], file=sys.stderr)
            progress.fail("the stack failed to start (log above)")
            return 1
        progress.tick()
        time.sleep(0.2)
    progress.fail(f"the stack was not ready within {args.timeout:.0f}s")
    _stop_supervisor(state)
    return 1


def _choose_kubelet(wanted: str) -> str:
    """``auto``: a real node (containerd + runc + kubelet v1.35) when this machine allows
    one, else the simulated kubelet; says which and why (ADR 0014)."""
    if wanted == "simulated":
        print("node: simulated kubelet (--kubelet simulated)")
        return wanted
    from testbed.node.realnode import machine_allows

    verdict = machine_allows(fetch=True)
    if wanted == "real" or verdict.ok:
        if not verdict.ok:
            print(f"node: real kubelet asked for, but {verdict.reason}; it will fail")
        else:
            how = "--kubelet real" if wanted == "real" else "auto"
            print(f"node: real kubelet v1.35 + containerd + runc ({how}: {verdict.reason})")
        return "real"
    print(f"node: simulated kubelet (auto: no real node here, {verdict.reason})")
    return "simulated"


def _supervisor_pid(state: Path) -> int | None:
    try:
        return int((state / "supervisor.pid").read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive: check its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _supervisor_alive(state: Path) -> bool:
    pid = _supervisor_pid(state)
    return pid is not None and _alive(pid)


def _stack_pids(state: Path) -> dict[str, int]:
    try:
        data = json.loads((state / "stack.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in (data.get("processes") or {}).items()}


def _stop_supervisor(state: Path, grace: float = 30.0) -> list[str]:
    pids = _stack_pids(state)
    pid = _supervisor_pid(state)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    leftovers = []
    for name, child in pids.items():
        if _alive(child):
            os.killpg(child, signal.SIGKILL)
            leftovers.append(name)
    (state / "supervisor.pid").unlink(missing_ok=True)
    return leftovers


def cmd_down(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    if _supervisor_pid(state) is None:
        print(f"no stack runs in {state}")
        return 0
    leftovers = _stop_supervisor(state)
    if leftovers:
        print(f"stopped; had to kill leftover processes: {', '.join(leftovers)}")
    else:
        print(f"stopped the stack in {state}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    if not _supervisor_alive(state):
        print(f"no stack runs in {state}")
        return 1
    print(f"stack in {state} (supervisor pid {_supervisor_pid(state)})")
    for name, pid in sorted(_stack_pids(state).items()):
        print(f"  {name:<20} pid {pid:<8} {'running' if _alive(pid) else 'EXITED'}")
    try:
        kube = _kube(args)
        vms = kube.get("/apis/cloudhypervisor.quill.today/v1beta1/virtualmachines")
    except (ApiError, OSError) as exc:
        print(f"  API server: unreachable ({exc})")
        return 1
    print(f"  API server: {kube.host}")
    for obj in vms.get("items") or []:
        meta = obj["metadata"]
        print(f"  vm {meta['namespace']}/{meta['name']}: {summary(obj)}")
    return 0


# --- resize ---------------------------------------------------------------------------


def cmd_resize(args: argparse.Namespace) -> int:
    if args.cpus is None and args.memory is None:
        print("nothing to do: give --cpus and/or --memory", file=sys.stderr)
        return 2
    kube = _kube(args)
    try:
        obj = resize_vm(kube, args.namespace, args.name, args.cpus, args.memory)
    except ApiError as exc:
        print(f"resize refused: {exc.message}", file=sys.stderr)
        return 1
    generation = obj["metadata"].get("generation")
    print(f"{args.namespace}/{args.name}: spec updated (generation {generation})")
    if not args.wait:
        return 0
    return follow(kube, args.namespace, args.name, args.timeout)


def follow(kube: Kube, namespace: str, name: str, timeout: float) -> int:
    """Show the phases of a resize until it converges; non-zero if it is refused."""
    progress = Progress()
    follower = Follower(kube, namespace, name)
    seen: list[str] = []

    def on_poll(obj: dict) -> None:
        phase = (obj.get("status") or {}).get("phase") or "-"
        if not seen or seen[-1] != phase:
            seen.append(phase)
            progress.step(f"{phase:<20} {summary(obj)}")
        else:
            progress.tick()

    try:
        obj = follower.wait(
            lambda o: converged(o) or resize_refused(o) is not None,
            timeout,
            on_poll,
            interval=0.05,
        )
    except TimeoutError as exc:
        progress.fail(str(exc))
        return 1
    refused = resize_refused(obj)
    if refused and not converged(obj):
        progress.fail(f"resize refused: {refused}")
        return 1
    progress.done(f"resized: {summary(obj)}")
    return 0


# --- demo -----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from apps.cli.demo import run_demo

    return run_demo(keep=args.keep, state_dir=args.state_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chscale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local stack and leave it running")
    up.add_argument("--state-dir", default=str(DEFAULT_STATE))
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--node-cpu", default="16")
    up.add_argument("--node-memory", default="32Gi")
    up.add_argument("--vmm-command", help="command template for a real cloud-hypervisor")
    up.add_argument("--kernel", help="guest kernel for a real cloud-hypervisor")
    up.add_argument(
        "--kubelet",
        choices=("auto", "real", "simulated"),
        # The environment's default lets a test suite pin the kind for the stacks it
        # starts through this command.
        default=os.environ.get("CHSCALE_NODE", "auto").strip().lower() or "auto",
        help="node kind: a real kubelet + containerd when the machine allows (auto), or "
        "either one explicitly (default: $CHSCALE_NODE, else auto)",
    )
    up.add_argument("--timeout", type=float, default=180.0)
    up.set_defaults(func=cmd_up)

    for name, func, text in (
        ("down", cmd_down, "stop a local stack"),
        ("status", cmd_status, "show what a local stack runs"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", default=str(DEFAULT_STATE))
        p.add_argument("--kubeconfig")
        p.set_defaults(func=func)

    rs = sub.add_parser("resize", help="change a VM's vCPUs and/or memory")
    rs.add_argument("name")
    rs.add_argument("-n", "--namespace", default="default")
    rs.add_argument("--cpus", type=int, help="total vCPUs (sockets x coresPerSocket)")
    rs.add_argument("--memory", type=memory_arg, help="guest memory, e.g. 8Gi")
    rs.add_argument("--wait", action="store_true", help="follow the phases until done")
    rs.add_argument("--timeout", type=float, default=300.0)
    rs.add_argument("--kubeconfig")
    rs.add_argument("--state-dir", default=str(DEFAULT_STATE))
    rs.set_defaults(func=cmd_resize)

    demo = sub.add_parser("demo", help="start a stack, grow, shrink, refuse, tear down")
    demo.add_argument("--keep", action="store_true", help="leave the stack running")
    demo.add_argument("--state-dir", help="default: a temporary directory")
    demo.set_defaults(func=cmd_demo)

    from apps.cli.simulate import add_parser as add_simulate

    add_simulate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
