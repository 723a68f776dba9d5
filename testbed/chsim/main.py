"""``chscale-ch-sim``: a Cloud Hypervisor stand-in that takes ``cloud-hypervisor``'s flags.

``chscale-ch-sim --api-socket path=/run/vm.sock --cpus boot=2,max=4
--memory size=1G,hotplug_method=virtio-mem,hotplug_size=4G`` creates and boots the VM at
start, as the real binary does when given a VM on its command line; with only
``--api-socket`` it waits for ``vm.create`` and ``vm.boot``. ``--sim-*`` flags tune the
simulated guest and inject faults; SIGUSR1 toggles a hang (no request is answered until
the next SIGUSR1). SIGTERM/SIGINT (and ``vmm.shutdown``) stop it; the
socket is removed on the way out.

Exit status: 0 after a clean stop, 1 when the VM on the command line cannot boot or the
socket is in use by another VMM, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

import attrs

from apps.common import logs
from apps.common.logs import kv
from sim.cloudhypervisor import (
    DEFAULT_VMM_OVERHEAD,
    LATEST_API_VERSION,
    NEVER,
    PLUG_NEVER,
    Knobs,
    VmmModel,
)
from testbed.chsim.ballast import Ballast
from testbed.chsim.server import ChSimServer, FaultPlan, SocketInUse

log = logging.getLogger("chscale.chsim")

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_ON_OFF = {"on": True, "off": False, "true": True, "false": False}
_CPUS_KEYS = {"boot", "max"}
_MEMORY_KEYS = {"size", "hotplug_method", "hotplug_size", "shared", "mergeable", "hugepages"}
DEFAULT_EJECT_DELAY_S = 0.5


class UsageError(ValueError):
    pass


def parse_size(text: str, flag: str) -> int:
    """Cloud Hypervisor's byte sizes: a number with an optional K/M/G/T (binary) suffix."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"{flag}: {text!r} is not a size (e.g. 512M, 4G, 1073741824)")
    return int(match.group(1)) << _SIZE_SHIFT[match.group(2).upper()]


def parse_options(text: str, flag: str, allowed: set[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise UsageError(f"{flag}: expected key=value, got {item!r}")
        if key not in allowed:
            raise UsageError(f"{flag}: unknown option {key!r}; known: {sorted(allowed)}")
        options[key] = value
    return options


def parse_eject_delay(text: str) -> float:
    """``--sim-eject-delay``: seconds, or ``never``."""
    if text.strip().lower() == "never":
        return NEVER
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < NEVER:
        raise UsageError(f"--sim-eject-delay: {text!r} is not a number of seconds >= 0 or never")
    return value


def parse_plug_rate(text: str) -> float | None:
    """``--sim-plug-rate``: bytes/s (K/M/G suffixes), ``0`` for at once, ``never``."""
    if text.strip().lower() == "never":
        return PLUG_NEVER
    rate = parse_size(text, "--sim-plug-rate")
    return float(rate) if rate else None


def parse_unplug_limit(text: str | None) -> int | None:
    if text is None or text.strip().lower() in ("", "none", "unlimited"):
        return None
    return parse_size(text, "--sim-unplug-limit")


def file_opens(path: str) -> bool:
    """What vm.boot needs of a payload file: that it can be opened for reading. Its
    content is not looked at, so an empty placeholder boots the simulated guest."""
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def socket_path(text: str) -> str:
    if "=" not in text:
        return text
    options = parse_options(text, "--api-socket", {"path", "fd"})
    if "path" not in options:
        raise UsageError("--api-socket: only path=<socket> is supported by the simulator")
    return options["path"]


def vm_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The VmConfig the command line describes, or None when it describes no VM."""
    if not (args.cpus or args.memory or args.kernel):
        return None
    cpus = parse_options(args.cpus or "", "--cpus", _CPUS_KEYS)
    try:
        boot = int(cpus.get("boot", "1"))
        top = int(cpus.get("max", str(boot)))
    except ValueError as exc:
        raise UsageError(f"--cpus: {exc}") from None
    options = parse_options(args.memory or "", "--memory", _MEMORY_KEYS)
    memory: dict[str, Any] = {"size": parse_size(options.get("size", "512M"), "--memory size")}
    if "hotplug_method" in options:
        method = options["hotplug_method"].lower()
        if method not in ("acpi", "virtio-mem"):
            raise UsageError(f"--memory hotplug_method: {method!r} is not acpi or virtio-mem")
        memory["hotplug_method"] = "VirtioMem" if method == "virtio-mem" else "Acpi"
    if "hotplug_size" in options:
        memory["hotplug_size"] = parse_size(options["hotplug_size"], "--memory hotplug_size")
    for flag in ("shared", "mergeable", "hugepages"):
        if flag in options:
            if options[flag].lower() not in _ON_OFF:
                raise UsageError(f"--memory {flag}: expected on or off, got {options[flag]!r}")
            memory[flag] = _ON_OFF[options[flag].lower()]
    payload = {
        key: value
        for key, value in (
            ("kernel", args.kernel),
            ("initramfs", args.initramfs),
            ("cmdline", args.cmdline),
        )
        if value
    }
    config: dict[str, Any] = {"cpus": {"boot_vcpus": boot, "max_vcpus": top}, "memory": memory}
    if payload:
        config["payload"] = payload
    return config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="chscale-ch-sim",
        description="Cloud Hypervisor API simulator (HTTP over a Unix socket).",
        epilog="Simulator-only endpoints (the real VMM answers 404): GET /api/v1/sim.guest "
        '-> {"memory_held": bytes the guest holds (boot + plugged, 0 before boot), '
        '"vcpus_online": vCPUs not yet ejected, "rss": memory_held + --sim-vmm-overhead}; '
        'PUT /api/v1/sim.exit {"code": N} answers 204, then the process exits with status '
        "N at once, as a crash would (socket file left behind). PUT /api/v1/vmm.shutdown "
        "exits 0 after answering.",
    )
    p.add_argument("--api-socket", required=True, help="path=<socket> or a bare path")
    p.add_argument("--cpus", help="boot=N,max=M")
    p.add_argument("--memory", help="size=S,hotplug_method=virtio-mem,hotplug_size=H")
    p.add_argument("--kernel")
    p.add_argument("--initramfs")
    p.add_argument("--cmdline")
    # Accepted so the real binary's command lines run unchanged; they change nothing here.
    for ignored in ("--serial", "--console", "--rng", "--seccomp", "--log-file"):
        p.add_argument(ignored, help=argparse.SUPPRESS)
    for repeated in ("--disk", "--net", "--fs"):
        p.add_argument(repeated, nargs="*", action="append", help=argparse.SUPPRESS)
    p.add_argument("-v", dest="verbose", action="count", default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--sim-eject-delay",
        default=str(DEFAULT_EJECT_DELAY_S),
        metavar="SECONDS|never",
        help="seconds of guest running time the guest takes to eject vCPUs marked for "
        "removal (default %(default)s); never: the removal stays pending for ever, every "
        "vCPU request (the same target included) answers 429, and asking for the count "
        "still running answers 204 and leaves it pending",
    )
    p.add_argument(
        "--sim-plug-rate",
        default="0",
        metavar="BYTES_PER_S|0|never",
        help="virtio-mem plug and unplug speed of the guest driver in bytes/s, with "
        "K/M/G suffixes (default 0: at once); never: nothing plugs or unplugs, "
        "memory_actual_size stays at the boot size (v52+)",
    )
    p.add_argument(
        "--sim-unplug-limit",
        default=None,
        metavar="QUANTITY",
        help="how much memory the guest can give back in total over one boot (e.g. 256Mi; "
        "0: nothing; default: all); an unplug stops there and stays",
    )
    p.add_argument(
        "--sim-vmm-overhead",
        default=f"{DEFAULT_VMM_OVERHEAD >> 20}Mi",
        metavar="QUANTITY",
        help="memory the VMM process holds besides guest memory, reported as part of rss "
        "by GET /api/v1/sim.guest (default %(default)s)",
    )
    p.add_argument("--sim-latency", type=float, default=0.0, help="seconds added to each answer")
    p.add_argument(
        "--sim-error-rate",
        type=float,
        default=0.0,
        help="probability of a 500 on each request to --sim-error-endpoints",
    )
    p.add_argument("--sim-error-seed", type=int, default=0)
    p.add_argument("--sim-error-endpoints", default="vm.resize", help="comma-separated")
    p.add_argument(
        "--sim-api-version",
        type=int,
        default=LATEST_API_VERSION,
        metavar="N",
        help="the Cloud Hypervisor release to reproduce (default %(default)s): before 52 "
        "memory_actual_size is the requested size and desired_ram below the boot size is "
        "a silent 204 that leaves the virtio-mem device as it was (the next grow to that "
        "size is a 500 'identical'); from 52 it is what the guest has plugged and below "
        "the boot size is a 500; from 53 info/boot/resize with no VM answer 404 (500 "
        "'VM is not created' before); vmm.ping reports v<N>.0",
    )
    p.add_argument(
        "--sim-progress-while-paused",
        action="store_true",
        help="let the guest plug memory and eject vCPUs while paused",
    )
    p.add_argument(
        "--sim-omit-memory-actual-size",
        action="store_true",
        help="leave memory_actual_size out of vm.info (exercises a client's fallback)",
    )
    p.add_argument(
        "--sim-strict-pending-removal",
        action="store_true",
        help="429 for every vCPU count change while a removal is pending, including "
        "the count the guest still has (Cloud Hypervisor accepts that one)",
    )
    p.add_argument(
        "--sim-rust-backtrace",
        action="store_true",
        help="answer as a VMM started with RUST_BACKTRACE=1: a multi-line stack backtrace "
        "appended to every 500 body, each such answer 0.5 s slower (a flag, not the "
        "variable itself, so a developer's environment does not change the simulator)",
    )
    p.add_argument(
        "--sim-report-shutdown-state",
        action="store_true",
        help="report Shutdown after vm.shutdown (Cloud Hypervisor reports Created)",
    )
    p.add_argument(
        "--sim-touch-memory",
        action="store_true",
        help="really hold (allocate and touch) the memory the guest holds, so that the VM "
        "pod's cgroup sees the guest's usage as with a real VMM (the real node's VM pods)",
    )
    p.add_argument("--sim-name", default="", help="the VM name used in logs")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


@attrs.frozen
class Plan:
    """Everything the command line asks for, checked before anything is bound."""

    socket_path: str
    knobs: Knobs
    faults: FaultPlan
    config: dict[str, Any] | None
    vm_name: str
    touch_memory: bool = False


def plan(args: argparse.Namespace) -> Plan:
    knobs = Knobs(
        api_version=args.sim_api_version,
        eject_delay_s=parse_eject_delay(args.sim_eject_delay),
        plug_rate=parse_plug_rate(args.sim_plug_rate),
        unplug_limit=parse_unplug_limit(args.sim_unplug_limit),
        vmm_overhead=parse_size(args.sim_vmm_overhead, "--sim-vmm-overhead"),
        latency_s=args.sim_latency,
        progress_while_paused=args.sim_progress_while_paused,
        report_memory_actual_size=not args.sim_omit_memory_actual_size,
        strict_pending_removal=args.sim_strict_pending_removal,
        report_shutdown_state=args.sim_report_shutdown_state,
        rust_backtrace=args.sim_rust_backtrace,
    )
    faults = FaultPlan(
        rate=args.sim_error_rate,
        seed=args.sim_error_seed,
        endpoints=[e.strip() for e in args.sim_error_endpoints.split(",") if e.strip()],
    )
    return Plan(
        socket_path(args.api_socket),
        knobs,
        faults,
        vm_config(args),
        args.sim_name,
        touch_memory=args.sim_touch_memory,
    )


class BootFailed(RuntimeError):
    pass


def boot_from_command_line(server: ChSimServer, config: dict[str, Any]) -> None:
    for endpoint, body in (("vm.create", json.dumps(config).encode()), ("vm.boot", None)):
        response = server.call("PUT", endpoint, body)
        if response.status >= 300:
            raise BootFailed(f"{endpoint} failed: {response.status} {response.body.decode()}")


def toggle_hang(server: ChSimServer) -> None:
    """SIGUSR1: stop answering (requests hang until the client times out), or resume."""
    server.model.hang = not server.model.hang
    log.warning("hang toggled", extra=kv(vm=server.vm_name, hang=server.model.hang))


class _Signals:
    """SIGTERM/SIGINT/SIGUSR1 handlers installed before the socket exists, so a signal
    that arrives while starting still ends with the socket removed."""

    def __init__(self) -> None:
        self.server: ChSimServer | None = None
        self.stop_requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGUSR1, self._hang)

    def _stop(self, signum: int, _frame: object) -> None:
        log.info("signal", extra=kv(signal=signal.Signals(signum).name))
        self.stop_requested = True
        if self.server is not None:
            self.server.stop_soon()

    def _hang(self, _signum: int, _frame: object) -> None:
        if self.server is not None:
            toggle_hang(self.server)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level)
    try:
        wanted = plan(args)
    except (UsageError, ValueError) as exc:
        log.error("bad arguments", extra=kv(error=str(exc)))
        return 2
    signals = _Signals()
    model = VmmModel(wanted.knobs, pid=os.getpid(), file_exists=file_opens)
    try:
        server = ChSimServer(
            wanted.socket_path,
            model,
            wanted.faults,
            vm_name=wanted.vm_name,
            ballast=Ballast() if wanted.touch_memory else None,
        )
    except SocketInUse as exc:
        log.error("cannot serve", extra=kv(socket=wanted.socket_path, error=str(exc)))
        return 1
    except OSError as exc:
        log.error("cannot bind", extra=kv(socket=wanted.socket_path, error=str(exc)))
        return 1
    signals.server = server
    try:
        if wanted.config is not None:
            boot_from_command_line(server, wanted.config)
        log.info(
            "serving",
            extra=kv(
                vm=server.vm_name,
                socket=server.socket_path,
                pid=os.getpid(),
                api_version=wanted.knobs.api_version,
                booted=wanted.config is not None,
            ),
        )
        if not signals.stop_requested:
            server.serve_forever()
    except BootFailed as exc:
        log.error(
            "cannot boot the VM from the command line", extra=kv(vm=server.vm_name, error=str(exc))
        )
        return 1
    finally:
        server.server_close()
    log.info("stopped", extra=kv(vm=server.vm_name, socket=server.socket_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
