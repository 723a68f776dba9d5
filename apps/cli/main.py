"""chscale: resize Cloud Hypervisor VMs in place, run the local stack, watch the demo.

Installed twice, as ``chscale`` and as ``kubectl-chscale``, so that kubectl finds it as
a plugin: ``kubectl chscale resize my-vm --cpus 12 --wait`` is ``chscale resize ...``.

  chscale resize NAME (--cpus N | --sockets S [--cores-per-socket C]) [--memory Q] [--wait]
  chscale up --state-dir DIR [--nodes N] [--node-cpu C] [--node-memory Q]
  chscale status --state-dir DIR
  chscale down --state-dir DIR
  chscale demo
  chscale simulate [--vms N] ...
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubernetes.config import ConfigException

from adapters.k8s.client import ApiError, Kube, NotFound, load_api_client
from apps.cli import nodekind
from apps.cli.progress import Progress
from apps.cli.vmops import (
    Follower,
    converged,
    count_arg,
    memory_arg,
    resize_refused,
    resize_vm,
    status_report,
    summary,
)

DEFAULT_STATE = Path(os.environ.get("CHSCALE_STATE_DIR", ".chscale"))
PLUGIN_NAME = "kubectl-chscale"


class Exit(enum.IntEnum):
    """The CLI's exit codes (also in ``--help``)."""

    OK = 0  # done: resized (with --wait), spec updated (without), stack up/down
    REFUSED = 1  # the API server, the webhook or chscale refused; or a stack command failed
    USAGE = 2  # bad flags or values (argparse's own code), or nothing to do
    NOT_FOUND = 3  # no such VirtualMachine
    TIMEOUT = 4  # --wait gave up after --timeout seconds; the resize may still finish
    UNREACHABLE = 5  # no kubeconfig, or the API server could not be reached
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODES = """exit codes:
  0    done: resized (with --wait) or spec updated (without); stack command succeeded
  1    refused: by the API server or the admission webhook (the message names the
       field), or by chscale (Resized=False: PodResizeInfeasible, ExceedsCapacity,
       Unsupported); or a stack command (up, status) failed
  2    usage: bad flags or values, or nothing to change
  3    the VirtualMachine does not exist
  4    --wait timed out; the resize goes on (watch it with kubectl get vm -w)
  5    no usable kubeconfig, or the API server could not be reached
  130  interrupted
"""

SIMULATE_EXIT_CODES = """exit codes:
  0    every invariant held
  1    an invariant was violated (the report lists them)
  2    usage: bad flags or values
  130  interrupted
"""

KUBECONFIG_HELP = (
    "kubeconfig file; default: --state-dir's if given, else $KUBECONFIG or "
    "~/.kube/config (as kubectl), else the local stack's in $CHSCALE_STATE_DIR (.chscale)"
)


def kubeconfig_path(args: argparse.Namespace) -> str | None:
    """Which kubeconfig a command uses: --kubeconfig, then an explicit --state-dir, then
    what kubectl would use ($KUBECONFIG, ~/.kube/config; None lets the client decide,
    in-cluster included), then the default local stack's."""
    if getattr(args, "kubeconfig", None):
        return str(args.kubeconfig)
    state_dir = getattr(args, "state_dir", None)
    if state_dir:
        return str(Path(state_dir) / "kubeconfig")
    if os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists():
        return None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    return str(DEFAULT_STATE / "kubeconfig")


def _kube(args: argparse.Namespace) -> Kube:
    return Kube(load_api_client(kubeconfig_path(args)))


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
    kubelet, why = nodekind.choose(args.kubelet)
    print(why)
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
    if (
        args.cpus is None
        and args.sockets is None
        and args.cores_per_socket is None
        and (args.memory is None)
    ):
        print(
            "nothing to do: give --cpus (or --sockets/--cores-per-socket) and/or --memory",
            file=sys.stderr,
        )
        return Exit.USAGE
    if args.cpus is not None and args.cores_per_socket is not None:
        print("give --cpus or --sockets/--cores-per-socket, not both", file=sys.stderr)
        return Exit.USAGE
    kubeconfig = kubeconfig_path(args)
    try:
        kube = Kube(load_api_client(kubeconfig))
    except (ConfigException, OSError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        print(f"no usable kubeconfig ({where}): {exc}", file=sys.stderr)
        return Exit.UNREACHABLE
    target = f"{args.namespace}/{args.name}"
    try:
        obj = resize_vm(
            kube,
            args.namespace,
            args.name,
            args.cpus,
            args.memory,
            sockets=args.sockets,
            cores_per_socket=args.cores_per_socket,
        )
    except NotFound:
        print(f"{target}: no such VirtualMachine", file=sys.stderr)
        return Exit.NOT_FOUND
    except ApiError as exc:
        print(f"{target}: resize refused: {exc.message}", file=sys.stderr)
        return Exit.REFUSED
    except OSError as exc:  # urllib3's connection errors are OSErrors
        print(f"{target}: API server unreachable: {exc}", file=sys.stderr)
        return Exit.UNREACHABLE
    generation = obj["metadata"].get("generation")
    print(f"{target}: spec updated (generation {generation})")
    if not args.wait:
        print(status_report(obj))
        return Exit.OK
    return follow(kube, args.namespace, args.name, args.timeout)


def follow(kube: Kube, namespace: str, name: str, timeout: float) -> int:
    """Show the phases of a resize until it converges, then the final status; exit
    code REFUSED if it was refused, TIMEOUT if it did not end in ``timeout`` s."""
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
        return Exit.TIMEOUT
    except OSError as exc:
        progress.fail(f"API server unreachable: {exc}")
        return Exit.UNREACHABLE
    refused = resize_refused(obj)
    if refused and not converged(obj):
        progress.fail(f"resize refused: {refused}")
        print(status_report(obj))
        return Exit.REFUSED
    progress.done(f"resized: {summary(obj)}")
    print(status_report(obj))
    return Exit.OK


# --- demo -----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from apps.cli.demo import run_demo

    return run_demo(keep=args.keep, state_dir=args.state_dir, kubelet=args.kubelet)


def _prog() -> str:
    """``kubectl chscale`` when kubectl runs us as its plugin, else ``chscale``."""
    return "kubectl chscale" if Path(sys.argv[0]).name == PLUGIN_NAME else "chscale"


def _kubelet_option(parser: argparse.ArgumentParser, auto: str) -> None:
    parser.add_argument(
        "--kubelet",
        choices=nodekind.KINDS,
        # The environment's default lets a test suite pin the kind for the stacks it
        # starts through this command.
        default=nodekind.default_kind(),
        help=f"node kind: a real kubelet + containerd {auto}, or either one explicitly "
        "(default: $CHSCALE_NODE, else auto)",
    )


def _sub(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=text,
        description=text,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rs = _sub(sub, "resize", "change a VM's vCPUs and/or memory, in place")
    rs.add_argument("name", help="the VirtualMachine's name")
    rs.add_argument(
        "-n", "--namespace", default="default", help="its namespace (default: %(default)s)"
    )
    cpus = rs.add_mutually_exclusive_group()
    cpus.add_argument(
        "--cpus",
        type=count_arg,
        metavar="N",
        help="total vCPUs (sockets x coresPerSocket); kept on the VM's socket count when "
        "that divides N, else 1 socket of N cores",
    )
    cpus.add_argument(
        "--sockets",
        type=count_arg,
        metavar="S",
        help="spec.instance.cpu.sockets (the seed's units); with --cores-per-socket or alone",
    )
    rs.add_argument(
        "--cores-per-socket",
        type=count_arg,
        metavar="C",
        help="spec.instance.cpu.coresPerSocket; a missing --sockets keeps the VM's",
    )
    rs.add_argument(
        "--memory",
        type=memory_arg,
        metavar="QUANTITY",
        help="guest memory as a Kubernetes quantity, e.g. 8Gi or 8192Mi (a multiple of 2Mi)",
    )
    rs.add_argument(
        "--wait",
        action="store_true",
        help="follow the phases until the guest holds the new size (or it is refused), "
        "then print the final status",
    )
    rs.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="seconds --wait waits (default: %(default)s)",
    )
    rs.add_argument("--kubeconfig", help=KUBECONFIG_HELP)
    rs.add_argument(
        "--state-dir", help="a local stack's directory: use its kubeconfig (from chscale up)"
    )
    rs.set_defaults(func=cmd_resize)

    up = _sub(sub, "up", "start a local stack and leave it running")
    up.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE),
        help="where the stack keeps its state, logs and kubeconfig (default: %(default)s)",
    )
    up.add_argument("--nodes", type=int, default=1, help="simulated nodes (default: %(default)s)")
    up.add_argument(
        "--node-cpu",
        default="16",
        help="CPUs each node offers; a real node's kubelet is shown that many, and the pods' "
        "CPU limits still run on the machine's (default: %(default)s)",
    )
    up.add_argument(
        "--node-memory",
        default="32Gi",
        help="memory each simulated node offers, a Kubernetes quantity; a real node offers "
        "the machine's, since its guests really hold theirs (default: %(default)s)",
    )
    up.add_argument(
        "--vmm-command",
        help="command template for a real cloud-hypervisor (default: the simulator)",
    )
    up.add_argument("--kernel", help="guest kernel for a real cloud-hypervisor")
    _kubelet_option(up, "when the machine allows (auto)")
    up.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="seconds to wait for the stack to be ready (default: %(default)s)",
    )
    up.set_defaults(func=cmd_up)

    for name, func, text in (
        ("down", cmd_down, "stop a local stack"),
        ("status", cmd_status, "show what a local stack runs and its VMs"),
    ):
        p = _sub(sub, name, text)
        p.add_argument(
            "--state-dir",
            default=str(DEFAULT_STATE),
            help="the stack's directory (default: %(default)s)",
        )
        p.add_argument("--kubeconfig", help="kubeconfig (default: the stack's)")
        p.set_defaults(func=func)

    demo = _sub(sub, "demo", "start a stack, grow, shrink, refuse, tear down")
    demo.add_argument("--keep", action="store_true", help="leave the stack running")
    demo.add_argument("--state-dir", help="where the stack runs (default: a temporary directory)")
    _kubelet_option(demo, "when the machine allows it and has the guest's memory free (auto)")
    demo.set_defaults(func=cmd_demo)

    from apps.cli.simulate import add_parser as add_simulate

    simulate = add_simulate(sub)
    simulate.epilog = SIMULATE_EXIT_CODES
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
