"""A pure model of one Cloud Hypervisor VMM as its HTTP API shows it (RESIZE.md section 6).

Theory of operation
-------------------
:class:`VmmModel` is a sans-I/O state machine. It never reads a clock, never sleeps and
never draws a random number: the caller passes the current time (``now``, seconds as a
float, any origin, never decreasing) and every decision that would be random (errors to
inject, delays) is a knob or an explicit call. The caller owns the socket; the model owns
every answer.

Two calls drive it:

- :meth:`VmmModel.handle` takes one request (method, path, raw body) and returns a
  :class:`Response` (status, raw body, content type, plus ``delay``/``hang`` hints the
  server honours: the model itself never waits).
- :meth:`VmmModel.advance` moves the guest forward to ``now``: vCPUs marked for removal
  are ejected ``eject_delay_s`` after the request; virtio-mem blocks are plugged or
  unplugged at ``plug_rate`` bytes/s (``None`` = at once). :meth:`handle` advances first,
  so a caller that only handles requests still sees progress; :meth:`next_event` tells a
  discrete-event scheduler when the guest will next change on its own.

The guest only makes progress while it runs: time spent ``Paused`` does not count
(``progress_while_paused`` changes that). Progress is measured on a *guest clock* that
accumulates running time, so pause/resume needs no special case in the plug arithmetic.

VM life cycle, as Cloud Hypervisor has it: ``vm.create`` only stores a config (checked
for JSON shape, 400; its values are checked at boot, 500). ``vm.boot`` builds the VM
(Created -> Running); ``vm.pause``/``vm.resume`` move between Running and Paused;
``vm.shutdown`` destroys the VM object but keeps the config, so ``vm.info`` then reports
``Created`` again (``report_shutdown_state`` reports ``Shutdown`` instead) and ``vm.boot``
boots it anew. The table ``_TRANSITIONS`` is the graph among booted states; the
refusals outside it (no config, not running, already booted) are the few rules written
as code next to it.

``vm.resize`` applies its parts in Cloud Hypervisor's order (vCPUs, memory, balloon) and
is not atomic: a part that fails answers 500 but the parts before it stay applied. On a
VM that is created but not booted (or shut down) a resize only edits the stored config,
unchecked: ``desired_ram`` then becomes the *boot* size.

vCPUs follow CpuManager: a request is compared with the vCPUs the guest still has
(``present_vcpus``, which includes those marked for removal), not with the config. A
shrink marks vCPUs for removal and the guest ejects them later; meanwhile any request
for another count is a 429. A request for exactly the present count is a no-op that
Cloud Hypervisor accepts and records in ``config.cpus.boot_vcpus`` without cancelling the
removal, so the config then shows more vCPUs than the guest ends up with
(``strict_pending_removal`` turns that into a 429, as RESIZE.md states the rule).

Version knobs (``api_version``) select the behaviour of older releases: the status for
"VM not created" (404 from v53, 500 before), error bodies (a JSON array of strings from
v47, plain text before), ``memory_actual_size`` (the virtio-mem *plugged* size from v52;
before, the *requested* size), ``desired_ram`` below the boot size (before v52 a silent
204 that only clears ``hotplugged_size``; a 500 from v52) and ``null`` optional fields
(omitted from v53). ``vmm.ping`` reports ``v<N>.0``, as a release built from its tag.

The guest is as kind as its knobs say (REALITY.md section 1): ``eject_delay_s=NEVER`` is
a guest whose ACPI eject never comes, ``plug_rate=PLUG_NEVER`` a virtio-mem driver that
does nothing, ``unplug_limit`` a guest that can give back only so much memory. The
defaults are a cooperative guest at the latest version.

``vm.boot`` checks the config as Cloud Hypervisor does: a payload with a kernel or
firmware is required, and its files must open; the model asks ``file_exists`` (given by
whoever owns a file system; in memory every path opens) and never reads them.

HTTP: the model also answers what micro_http, Cloud Hypervisor's HTTP library, refuses
before the router sees it (a method other than GET, PUT and PATCH; an oversized body):
:func:`http_error`, a 400 ``{"error": ...}`` that closes the connection. The server
uses the same function for requests it cannot frame.

Two endpoints exist only here: ``GET sim.guest`` (what the guest and the VMM process
hold: the simulated kubelet's cgroup usage) and ``PUT sim.exit`` (the process must exit
with the given status, as a crash).
"""

from __future__ import annotations

import copy
import enum
import json
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

MIB = 1 << 20
API_PREFIX = "/api/v1/"
# A virtio-mem region is made of Linux memory blocks; the device plugs 2 MiB blocks.
VIRTIO_MEM_REGION_ALIGN = 128 * MIB
VIRTIO_MEM_BLOCK = 2 * MIB
DEFAULT_BOOT_MEMORY = 512 * MIB
DEFAULT_MAX_PHYS_BITS = 46
JSON = "application/json"
# The HTTP layer (micro_http, as Cloud Hypervisor v50-v53 pin it): the only methods it
# parses, its own Server header, and the most body it reads.
HTTP_METHODS = ("GET", "PUT", "PATCH")
SERVER_HEADER = "Cloud Hypervisor API"
HTTP_LIBRARY_SERVER_HEADER = "Firecracker API"
MAX_PAYLOAD_SIZE = 51200
INVALID_METHOD = "Invalid HTTP Method: Unsupported HTTP method."
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
# Float slack so that advance(next_event()) always sees the event as due.
_CLOCK_SLACK = 1e-9

# The first API version with each behaviour (Cloud Hypervisor release numbers).
JSON_ERRORS_SINCE = 47
PLUGGED_MEMORY_ACTUAL_SIZE_SINCE = 52
# Before v52, desired_ram below the boot size is accepted and silently does nothing to the
# virtio-mem device (only config.memory.hotplugged_size is cleared).
BELOW_BOOT_REFUSED_SINCE = 52
NOT_CREATED_404_SINCE = 53
OMIT_NULL_FIELDS_SINCE = 53
LATEST_API_VERSION = 53
# A guest that never gets there: an eject delay of NEVER leaves a vCPU removal pending for
# ever; a plug rate of PLUG_NEVER plugs and unplugs nothing.
NEVER = math.inf
PLUG_NEVER = 0.0
DEFAULT_VMM_OVERHEAD = 64 * MIB
RUST_BACKTRACE_DELAY_S = 0.5
RUST_BACKTRACE_TEXT = "\n\nStack backtrace:\n" + "".join(
    f"  {i:>2}: vmm::frame_{i}\n             at ./vmm/src/lib.rs:{100 + 7 * i}:9\n"
    for i in range(24)
)


class VmState(enum.Enum):
    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


@attrs.frozen(slots=True)
class Response:
    """One HTTP answer. ``delay``, ``hang`` and ``close`` are instructions for the server,
    not part of the wire: wait ``delay`` seconds before answering, never answer, or close
    the connection once answered. ``server`` is the Server header: an answer from the HTTP
    library itself (a request it cannot parse) never reaches Cloud Hypervisor's router,
    which is what sets "Cloud Hypervisor API"."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON
    delay: float = 0.0
    hang: bool = False
    close: bool = False
    server: str = SERVER_HEADER

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@attrs.frozen(slots=True)
class Knobs:
    """How this VMM and its guest behave. The defaults are a cooperative guest on the
    latest API version; every other value is a way the real world is less kind."""

    api_version: int = LATEST_API_VERSION
    # Seconds (guest running time) the guest takes to eject vCPUs marked for removal;
    # NEVER: no ACPI eject ever comes (hung guest, no hotplug support, a CPU that cannot
    # go offline), so the removal stays pending and vCPU changes are 429s for ever.
    eject_delay_s: float = 0.5
    # virtio-mem (un)plug speed of the guest driver in bytes/s; None = at once;
    # PLUG_NEVER (0) = the driver plugs and unplugs nothing.
    plug_rate: float | None = None
    # Bytes the guest can give back over one boot, in total (Linux cannot unplug memory
    # that holds unmovable pages); None = all of it, 0 = nothing. Unplug stops there.
    unplug_limit: int | None = None
    # Bytes the VMM process holds besides guest memory (sim.guest's rss).
    vmm_overhead: int = DEFAULT_VMM_OVERHEAD
    latency_s: float = 0.0
    progress_while_paused: bool = False
    # Cloud Hypervisor drops the VM object on vm.shutdown and then reports "Created";
    # True reports "Shutdown" instead, to exercise a consumer's handling of that state.
    report_shutdown_state: bool = False
    # False leaves memory_actual_size out of vm.info, to exercise a consumer's fallback
    # (config.memory.size + hotplugged_size).
    report_memory_actual_size: bool = True
    # True: every vCPU count change while a removal is pending is a 429 (RESIZE.md's
    # statement of the rule). False: Cloud Hypervisor's code, see the module docstring.
    strict_pending_removal: bool = False
    # None: derived from api_version, as a release built from its git tag reports it.
    build_version: str | None = None
    # The VMM was started with RUST_BACKTRACE=1: every 500 carries a multi-line stack
    # backtrace and takes RUST_BACKTRACE_DELAY_S longer.
    rust_backtrace: bool = False

    def __attrs_post_init__(self) -> None:
        if self.api_version < 1:
            raise ValueError(f"api_version must be >= 1, got {self.api_version}")
        if not self.eject_delay_s >= 0:  # also refuses NaN
            raise ValueError(f"eject_delay_s must be >= 0 or NEVER, got {self.eject_delay_s}")
        if self.plug_rate is not None and not 0 <= self.plug_rate < math.inf:
            raise ValueError(
                f"plug_rate must be >= 0 bytes/s (0: never), or None (at once), "
                f"got {self.plug_rate}"
            )
        if self.unplug_limit is not None and self.unplug_limit < 0:
            raise ValueError(f"unplug_limit must be >= 0 bytes or None, got {self.unplug_limit}")
        if self.vmm_overhead < 0:
            raise ValueError(f"vmm_overhead must be >= 0 bytes, got {self.vmm_overhead}")
        if not self.latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")

    @property
    def plugs(self) -> bool:
        return self.plug_rate != PLUG_NEVER

    @property
    def below_boot_refused(self) -> bool:
        return self.api_version >= BELOW_BOOT_REFUSED_SINCE

    @property
    def json_errors(self) -> bool:
        return self.api_version >= JSON_ERRORS_SINCE

    @property
    def plugged_memory_actual_size(self) -> bool:
        return self.api_version >= PLUGGED_MEMORY_ACTUAL_SIZE_SINCE

    @property
    def omits_null_fields(self) -> bool:
        return self.api_version >= OMIT_NULL_FIELDS_SINCE

    @property
    def not_created_status(self) -> int:
        return 404 if self.api_version >= NOT_CREATED_404_SINCE else 500

    @property
    def build(self) -> str:
        return self.build_version or f"v{self.api_version}.0"


def http_error(reason: str) -> Response:
    """micro_http's answer to a request it cannot parse (a method it does not know, a bad
    header, an oversized body): 400 with a ``{"error": ...}`` object, not the router's
    JSON array, and the connection closed. The body is micro_http's format string
    verbatim, a raw newline inside the string included (strict JSON parsers refuse it)."""
    text = f'{{ "error": "{reason}\nAll previous unanswered requests will be dropped." }}'
    return Response(status=400, body=text.encode(), close=True, server=HTTP_LIBRARY_SERVER_HEADER)


class _ApiError(Exception):
    """A refused request: status plus the message chain Cloud Hypervisor would print
    (outermost first). ``bare`` answers the status with no body at all."""

    def __init__(self, status: int, *messages: str, bare: bool = False) -> None:
        super().__init__(": ".join(messages) or str(status))
        self.status = status
        self.messages = messages
        self.bare = bare


GET, PUT = "GET", "PUT"
SIM_GUEST = "sim.guest"
SIM_EXIT = "sim.exit"
# endpoint -> the one method it serves
_ENDPOINTS: dict[str, str] = {
    "vmm.ping": GET,
    "vmm.shutdown": PUT,
    "vm.create": PUT,
    "vm.boot": PUT,
    "vm.pause": PUT,
    "vm.resume": PUT,
    "vm.shutdown": PUT,
    "vm.info": GET,
    "vm.resize": PUT,
    "vm.delete": PUT,
    # Simulator only (the real VMM answers 404): what the guest and the VMM process hold
    # (the simulated kubelet's cgroup usage), and a crash on request.
    SIM_GUEST: GET,
    SIM_EXIT: PUT,
}
# Endpoints routed through Cloud Hypervisor's generic action handler: a method other
# than GET/PUT gets a bare 400 there, where the dedicated handlers answer with a body.
_ACTION_HANDLERS = frozenset(
    {"vm.boot", "vm.pause", "vm.resume", "vm.shutdown", "vm.resize", "vm.delete"}
)
_NO_BODY = frozenset({"vm.boot", "vm.pause", "vm.resume", "vm.shutdown", "vm.delete"})

FROM_API = "Error from API"
# The second message of each endpoint's error chain (Cloud Hypervisor's ApiError).
_FAILURE = {
    "vm.create": "The VM could not be created",
    "vm.boot": "The VM could not boot",
    "vm.pause": "The VM could not be paused",
    "vm.resume": "The VM could not resume",
    "vm.shutdown": "The VM could not shutdown",
    "vm.info": "The VM info is not available",
    "vm.resize": "The VM could not be resized",
    "vm.delete": "The VM could not be deleted",
}
NOT_CREATED = "VM is not created"
MISSING_CONFIG = "VM config is missing"
ALREADY_CREATED = "VM is already created"
NOT_RUNNING = "VM is not running"
TOO_MANY_REQUESTS = "Too Many Requests"

_BOOTED = frozenset({VmState.RUNNING, VmState.PAUSED})
# action on a booted VM -> (states it may start from, state it leads to, what failed)
_TRANSITIONS: dict[str, tuple[frozenset[VmState], VmState, str]] = {
    "vm.pause": (frozenset({VmState.RUNNING}), VmState.PAUSED, "Cannot pause VM"),
    "vm.resume": (frozenset({VmState.PAUSED}), VmState.RUNNING, "Cannot resume VM"),
    "vm.shutdown": (_BOOTED, VmState.SHUTDOWN, "Cannot shutdown VM"),
}
HOTPLUG_METHODS = ("Acpi", "VirtioMem")
CONSOLE_MODES = ("Off", "Pty", "Tty", "File", "Socket", "Null")
# The payload's files, in the order Cloud Hypervisor opens them at boot.
PAYLOAD_FILES = ("firmware", "kernel", "initramfs")
_PAYLOAD_FILE_ERRORS = {
    "firmware": "Cannot open the firmware image",
    "kernel": "Cannot open the kernel image",
    "initramfs": "Cannot open the initramfs image",
}
NO_SUCH_FILE = "No such file or directory (os error 2)"
# serde defaults Cloud Hypervisor fills in for the fields a vm.create body leaves out.
_CPUS_DEFAULTS: dict[str, Any] = {
    "kvm_hyperv": False,
    "max_phys_bits": DEFAULT_MAX_PHYS_BITS,
    "nested": True,
}
_MEMORY_DEFAULTS: dict[str, Any] = {
    "mergeable": False,
    "hotplug_method": "Acpi",
    "hotplug_size": None,
    "hotplugged_size": None,
    "shared": False,
    "hugepages": False,
    "hugepage_size": None,
    "prefault": False,
    "zones": None,
    "thp": True,
}


def _deserialize_error(message: str) -> _ApiError:
    return _ApiError(400, "Failed to deserialize JSON", message)


def _uint(value: Any, field: str, top: int, required: bool = False) -> int | None:
    """serde's view of an unsigned integer field: a wrong type is a 400."""
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise _deserialize_error(f"{field}: expected an unsigned integer, got {value!r}")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _deserialize_error(f"{field}: expected a boolean, got {value!r}")
    return value


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _deserialize_error(f"{field}: expected a JSON object, got {value!r}")
    return value


def _every_file_exists(_path: str) -> bool:
    return True


def _str(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _deserialize_error(f"{field}: expected a string, got {value!r}")
    return value


def _enum(value: Any, field: str, variants: tuple[str, ...]) -> None:
    if value not in variants:
        raise _deserialize_error(
            f"{field}: unknown variant {value!r}, expected one of {', '.join(variants)}"
        )


def _check_shape(config: dict[str, Any]) -> None:
    """serde's checks on the parts of a VmConfig besides cpus, memory and balloon that
    chscale and its tests send: payload, serial and console."""
    payload = config.get("payload")
    if payload is not None:
        _object(payload, "payload")
        for field in (*PAYLOAD_FILES, "cmdline"):
            _str(payload.get(field), f"payload.{field}")
    for device in ("serial", "console"):
        if config.get(device) is None:
            continue
        console = _object(config[device], device)
        if "mode" not in console:
            raise _deserialize_error(f"{device}: missing field `mode`")
        _enum(console["mode"], f"{device}.mode", CONSOLE_MODES)
        _str(console.get("file"), f"{device}.file")


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


class VmmModel:
    """One VMM process: the API, the VM's state and the guest's asynchronous progress."""

    def __init__(
        self,
        knobs: Knobs | None = None,
        pid: int = 0,
        now: float = 0.0,
        file_exists: Callable[[str], bool] | None = None,
    ) -> None:
        self.knobs = knobs or Knobs()
        self.pid = pid
        # The model's one view of the host: can vm.boot open the payload's files? The
        # caller that owns a file system passes it; in memory every path opens.
        self._file_exists = file_exists or _every_file_exists
        # None: no config. CREATED: a config, no VM object (never booted, failed to
        # boot, or shut down: SHUTDOWN keeps that apart for report_shutdown_state).
        self.state: VmState | None = None
        self.config: dict[str, Any] | None = None
        self.vmm_shutdown_requested = False
        # Set by sim.exit: the process must exit with this status once it has answered.
        self.exit_code: int | None = None
        self.hang = False
        # vCPUs the guest has, including those marked for removal (CpuManager's
        # "present" count), and the count a pending removal will leave.
        self._present_vcpus = 0
        self._removal_target: int | None = None
        self._eject_at: float | None = None  # guest-clock time of the pending ejection
        # virtio-mem: bytes requested of the device (its requested_size) and plugged.
        self._hotplug_requested = 0
        self._plugged = 0
        self._plug_from = 0  # plugged bytes when the current plug/unplug began
        self._plug_since = 0.0  # guest-clock time it began
        # Bytes the guest has given back since it booted (Knobs.unplug_limit), and as of
        # the start of the current plug/unplug.
        self._unplugged = 0
        self._unplugged_before = 0
        self._last_now = now
        self._guest_clock = 0.0
        self._forced: dict[str, deque[Response]] = {}

    # ---- knobs for tests and simulations -------------------------------------------

    def inject(self, endpoint: str, response: Response, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``endpoint`` (e.g. ``"vm.resize"``) with
        ``response`` instead of processing them (nothing changes in the VM)."""
        if endpoint not in _ENDPOINTS:
            raise ValueError(f"inject: unknown endpoint {endpoint!r}; known: {sorted(_ENDPOINTS)}")
        if times < 1:
            raise ValueError(f"inject: times must be >= 1, got {times}")
        self._forced.setdefault(endpoint, deque()).extend([response] * times)

    def error(self, status: int, *messages: str) -> Response:
        """An error response in the format of the configured API version."""
        return self._error(_ApiError(status, *messages))

    # ---- introspection --------------------------------------------------------------

    @property
    def booted(self) -> bool:
        # A tuple, not _BOOTED: hashing an Enum member runs Python code, and the
        # simulation asks this of every VMM on a node at each kubelet step.
        state = self.state
        return state is VmState.RUNNING or state is VmState.PAUSED

    @property
    def requested_vcpus(self) -> int:
        """``config.cpus.boot_vcpus``: what was last asked for."""
        return int(self.config["cpus"]["boot_vcpus"]) if self.config else 0

    @property
    def present_vcpus(self) -> int:
        """vCPUs the guest has now, including those marked for removal."""
        return self._present_vcpus

    @property
    def guest_vcpus_settled(self) -> int:
        """vCPUs the guest will have once pending removals complete."""
        if self._removal_target is not None:
            return self._removal_target
        return self._present_vcpus

    @property
    def pending_vcpu_removal(self) -> int:
        if self._removal_target is None:
            return 0
        return self._present_vcpus - self._removal_target

    @property
    def plugged_memory(self) -> int:
        return self._plugged

    @property
    def requested_hotplug(self) -> int:
        return self._hotplug_requested

    @property
    def memory_actual_size(self) -> int:
        """Cloud Hypervisor's figure. From v52: boot size minus the balloon plus what
        virtio-mem has plugged, the boot size while no VM runs. Before: boot size plus
        the *requested* hotplug amount, minus the balloon while a VM runs."""
        config = self.config
        if config is None:
            return 0
        # _boot_memory, _balloon and booted written out: the simulation reads this for
        # every VMM of a node at each kubelet step and on every daemon look.
        boot = int(config["memory"]["size"]) if config else 0
        if not self.knobs.plugged_memory_actual_size:
            hotplugged = config["memory"].get("hotplugged_size") or 0
            return boot + hotplugged - (self._balloon if self.booted else 0)
        state = self.state
        if state is not VmState.RUNNING and state is not VmState.PAUSED:
            return boot
        balloon = config.get("balloon") if config else None
        size = int(balloon.get("size") or 0) if isinstance(balloon, dict) else 0
        return max(0, boot - size) + self._plugged

    @property
    def _balloon(self) -> int:
        balloon = self.config.get("balloon") if self.config else None
        return int(balloon.get("size") or 0) if isinstance(balloon, dict) else 0

    @property
    def _boot_memory(self) -> int:
        return int(self.config["memory"]["size"]) if self.config else 0

    @property
    def _guest_runs(self) -> bool:
        return self.state is VmState.RUNNING or (
            self.state is VmState.PAUSED and self.knobs.progress_while_paused
        )

    # ---- time ---------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Let the guest progress up to ``now`` (ejections, virtio-mem plugging)."""
        # _guest_runs and Knobs.plugs written out: every VMM of a node is advanced at
        # each kubelet step, and again on every daemon look.
        knobs = self.knobs
        if now > self._last_now:
            state = self.state
            if state is VmState.RUNNING or (
                state is VmState.PAUSED and knobs.progress_while_paused
            ):
                self._guest_clock += now - self._last_now
            self._last_now = now
        if self._eject_at is not None and self._guest_clock + _CLOCK_SLACK >= self._eject_at:
            assert self._removal_target is not None
            self._present_vcpus = self._removal_target
            self._removal_target = self._eject_at = None
        if (
            self._plugged == self._hotplug_requested
            and knobs.unplug_limit is None
            and knobs.plug_rate != PLUG_NEVER
        ):
            return  # at rest, where _plug_end() is: _plug_position() would leave it there
        plugged = self._plug_position(self._guest_clock)
        if plugged < self._plugged:
            self._unplugged += self._plugged - plugged
        self._plugged = plugged

    def next_event(self) -> float | None:
        """When (caller's time) the guest will next change on its own, or None. While the
        guest does not run nothing is due."""
        if not self._guest_runs:
            return None
        due: list[float] = []
        if self._eject_at is not None and math.isfinite(self._eject_at):
            due.append(self._eject_at)
        end = self._plug_end()
        rate = self.knobs.plug_rate
        if self._plugged != end and rate:
            moved = abs(self._plugged - self._plug_from)
            step = min(VIRTIO_MEM_BLOCK, abs(end - self._plugged))
            due.append(self._plug_since + (moved + step) / rate)
        if not due:
            return None
        return self._last_now + max(0.0, min(due) - self._guest_clock)

    def _plug_end(self) -> int:
        """Where the current plug/unplug stops: the requested size, unless the guest
        cannot give that much back (``unplug_limit``) or its driver does nothing."""
        target = self._hotplug_requested
        if not self.knobs.plugs:
            return self._plug_from
        limit = self.knobs.unplug_limit
        if target < self._plug_from and limit is not None:
            budget = max(0, limit - self._unplugged_before)
            return max(target, self._plug_from - budget)
        return target

    def _plug_position(self, guest_clock: float) -> int:
        end = self._plug_end()
        if self._plugged == end:
            return end
        distance = abs(end - self._plug_from)
        if self.knobs.plug_rate is None:
            moved = distance
        else:
            elapsed = guest_clock - self._plug_since
            # Whole blocks only: the guest plugs 2 MiB at a time. Half a byte of slack
            # so that advance(next_event()) always lands the block despite rounding.
            moved = int(elapsed * self.knobs.plug_rate + 0.5) // VIRTIO_MEM_BLOCK
            moved = min(moved * VIRTIO_MEM_BLOCK, distance)
        return self._plug_from + moved if end > self._plug_from else self._plug_from - moved

    # ---- the API ------------------------------------------------------------------

    def handle(self, now: float, method: str, path: str, body: bytes | None) -> Response:
        self.advance(now)
        if self.hang:
            return Response(status=0, body=b"", hang=True)
        if method not in HTTP_METHODS:  # case-sensitive, as micro_http parses it
            return http_error(INVALID_METHOD)
        if body is not None and len(body) > MAX_PAYLOAD_SIZE:
            return http_error(
                f"Request payload with size {len(body)} is larger than the limit of "
                f"{MAX_PAYLOAD_SIZE} allowed by server."
            )
        response = self._route(method, path, body or None)
        if self.knobs.latency_s and not response.delay:
            response = attrs.evolve(response, delay=self.knobs.latency_s)
        return response

    def _route(self, method: str, path: str, body: bytes | None) -> Response:
        # micro_http's absolute path: an "http://host" prefix dropped, the rest (a query
        # string included) matched exactly against the routes.
        if path.startswith("http://"):
            rest = path[len("http://") :]
            path = rest[rest.index("/") :] if "/" in rest else ""
        endpoint = path[len(API_PREFIX) :] if path.startswith(API_PREFIX) else None
        if endpoint is None or endpoint not in _ENDPOINTS:
            return self._error(_ApiError(404, "Not Found"))
        if method != _ENDPOINTS[endpoint]:
            # The generic action handler answers a method it has no handler for (PATCH)
            # with a bare 400; the dedicated handlers answer ["Bad Request"].
            bare = endpoint in _ACTION_HANDLERS and method not in (GET, PUT)
            return self._error(_ApiError(400, "Bad Request", bare=bare))
        forced = self._forced.get(endpoint)
        if forced:
            return forced.popleft()
        try:
            return self._dispatch(endpoint, body)
        except _ApiError as exc:
            return self._error(exc)

    def _dispatch(self, endpoint: str, body: bytes | None) -> Response:
        if endpoint in _NO_BODY and body is not None:
            raise _ApiError(400, "Bad Request")
        if endpoint == "vmm.ping":
            return self._json(200, self._ping())
        if endpoint == "vmm.shutdown":
            self._vmm_shutdown()
            return Response(status=200, body=b"")
        if endpoint == "vm.create":
            if body is None:
                raise _ApiError(400, bare=True)
            self._create(self._parse(body))
            return Response(status=204)
        if endpoint == "vm.info":
            return self._json(200, self._info())
        if endpoint == SIM_GUEST:
            return self._json(200, self.guest_usage())
        if endpoint == SIM_EXIT:
            self.exit_code = self._exit_code(body)
            return Response(status=204)
        if endpoint == "vm.delete":
            self._delete()
            return Response(status=204)
        if endpoint == "vm.resize":
            if body is None:
                raise _ApiError(400, "Bad Request")
            self._resize(self._parse(body))
            return Response(status=204)
        if endpoint == "vm.boot":
            self._boot()
        else:
            self._transition(endpoint)
        return Response(status=204)

    def _error(self, exc: _ApiError) -> Response:
        if exc.bare:
            return Response(status=exc.status)
        messages, delay = list(exc.messages), 0.0
        if self.knobs.rust_backtrace and exc.status == 500 and messages:
            # A VMM started with RUST_BACKTRACE=1 captures a backtrace with each error
            # (slowly) and prints it with the innermost message.
            messages[-1] += RUST_BACKTRACE_TEXT
            delay = RUST_BACKTRACE_DELAY_S
        if self.knobs.json_errors:
            body = json.dumps(messages).encode()
        else:
            body = ": ".join(messages).encode()
        return Response(status=exc.status, body=body, delay=delay)

    @staticmethod
    def _json(status: int, value: Any) -> Response:
        return Response(status=status, body=json.dumps(value).encode())

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _deserialize_error(str(exc)) from None
        return _object(value, "body")

    def _refused(self, endpoint: str, *cause: str, status: int = 500) -> _ApiError:
        return _ApiError(status, FROM_API, _FAILURE[endpoint], *cause)

    def _not_created(self, endpoint: str, cause: str = NOT_CREATED) -> _ApiError:
        return self._refused(endpoint, cause, status=self.knobs.not_created_status)

    # ---- endpoints ----------------------------------------------------------------

    def _ping(self) -> dict[str, Any]:
        return {
            "build_version": self.knobs.build,
            "version": f"{self.knobs.api_version}.0.0",
            "pid": self.pid,
            "features": ["kvm"],
        }

    def _vmm_shutdown(self) -> None:
        # Cloud Hypervisor deletes the VM (shutting it down first), then the process exits.
        self.vmm_shutdown_requested = True
        if self.booted:
            self._set_state(VmState.SHUTDOWN)
        self.state = self.config = None

    def _delete(self) -> None:
        # Cloud Hypervisor's vm_delete: shut a booted VM down, then forget the config; a
        # no-op (still 204) when there is none.
        if self.booted:
            self._set_state(VmState.SHUTDOWN)
        self.state = self.config = None

    def _exit_code(self, body: bytes | None) -> int:
        if body is None:
            raise _ApiError(400, "Bad Request", 'sim.exit needs a body {"code": N}')
        request = self._parse(body)
        if "code" not in request:
            raise _deserialize_error("missing field `code`")
        code = _uint(request["code"], "code", 255, required=True)
        assert code is not None
        return code

    def guest_usage(self) -> dict[str, int]:
        """``sim.guest``: the memory the guest holds (boot memory plus what virtio-mem has
        plugged and the guest not yet given back), its vCPUs not yet ejected, and what the
        VMM process holds (the guest's memory, touched once booted, plus its own)."""
        held = self._boot_memory + self._plugged if self.booted else 0
        return {
            "memory_held": held,
            "vcpus_online": self._present_vcpus if self.booted else 0,
            "rss": held + self.knobs.vmm_overhead,
        }

    def _create(self, raw: dict[str, Any]) -> None:
        """Shape only, as serde checks it; the values are checked at boot."""
        config = copy.deepcopy(raw)
        cpus = _object(config.get("cpus", {"boot_vcpus": 1, "max_vcpus": 1}), "cpus")
        for field in ("boot_vcpus", "max_vcpus"):
            if field not in cpus:
                raise _deserialize_error(f"cpus: missing field `{field}`")
            _uint(cpus[field], f"cpus.{field}", U32_MAX, required=True)
        memory = _object(config.get("memory", {"size": DEFAULT_BOOT_MEMORY}), "memory")
        if "size" not in memory:
            raise _deserialize_error("memory: missing field `size`")
        _uint(memory["size"], "memory.size", U64_MAX, required=True)
        memory = {**_MEMORY_DEFAULTS, **memory}
        if memory["hotplug_method"] not in HOTPLUG_METHODS:
            raise _deserialize_error(
                f"memory.hotplug_method: unknown variant {memory['hotplug_method']!r}, "
                f"expected one of {', '.join(HOTPLUG_METHODS)}"
            )
        for field in ("hotplug_size", "hotplugged_size", "hugepage_size"):
            _uint(memory[field], f"memory.{field}", U64_MAX)
        for field in ("mergeable", "shared", "hugepages", "prefault", "thp"):
            _bool(memory[field], f"memory.{field}")
        if config.get("balloon") is not None:
            balloon = _object(config["balloon"], "balloon")
            _uint(balloon.get("size"), "balloon.size", U64_MAX, required=True)
        for field in ("kvm_hyperv", "nested"):
            if field in cpus:
                _bool(cpus[field], f"cpus.{field}")
        if "max_phys_bits" in cpus:
            _uint(cpus["max_phys_bits"], "cpus.max_phys_bits", 255, required=True)
        _check_shape(config)
        if self.config is not None:
            raise self._refused("vm.create", ALREADY_CREATED)
        config["cpus"] = {**_CPUS_DEFAULTS, **cpus}
        config["memory"] = memory
        self.config = config
        self.state = VmState.CREATED

    def _boot(self) -> None:
        if self.config is None:
            raise self._not_created("vm.boot", MISSING_CONFIG)
        if self.booted:
            raise self._refused("vm.boot", ALREADY_CREATED)
        problem = self._boot_problem()
        if problem:
            raise self._refused("vm.boot", *problem)
        self._present_vcpus = self.requested_vcpus
        self._removal_target = self._eject_at = None
        # A fresh guest starts with what the config asks for already plugged (unless its
        # driver never plugs anything).
        self._hotplug_requested = self.config["memory"].get("hotplugged_size") or 0
        self._plugged = self._plug_from = self._hotplug_requested if self.knobs.plugs else 0
        self._plug_since = self._guest_clock
        self._unplugged = self._unplugged_before = 0
        self.state = VmState.RUNNING

    def _boot_problem(self) -> tuple[str, ...]:
        """Why this config cannot boot (the checks Cloud Hypervisor's managers make when
        they build the VM), or an empty tuple."""
        assert self.config is not None
        cpus, memory = self.config["cpus"], self.config["memory"]
        payload = self.config.get("payload") or {}
        if not (payload.get("kernel") or payload.get("firmware")):
            return ("Error validating configuration", "No kernel or firmware specified")
        if cpus["boot_vcpus"] < 1:
            return ("Error from CPU manager", "cpus.boot_vcpus must be at least 1")
        if cpus["max_vcpus"] < cpus["boot_vcpus"]:
            return (
                "Error from CPU manager",
                f"cpus.max_vcpus ({cpus['max_vcpus']}) is below cpus.boot_vcpus "
                f"({cpus['boot_vcpus']})",
            )
        if memory["size"] == 0:
            return ("Memory manager error", "memory.size must be greater than 0")
        region = memory["hotplug_size"]
        if region is not None and region == 0:
            return ("Memory manager error", "'hotplug_size' can't be 0")
        if memory["hotplug_method"] == "VirtioMem" and region:
            if region % VIRTIO_MEM_REGION_ALIGN:
                return (
                    "Error from device manager",
                    f"Virtio-mem size ({region} bytes) is not aligned with "
                    f"{VIRTIO_MEM_REGION_ALIGN} (128 MiB)",
                )
            hotplugged = memory["hotplugged_size"] or 0
            if hotplugged > region or hotplugged % VIRTIO_MEM_BLOCK:
                return (
                    "Error from device manager",
                    f"memory.hotplugged_size ({hotplugged}) must be a multiple of "
                    f"{VIRTIO_MEM_BLOCK} within hotplug_size ({region})",
                )
        # Opened last, once the VM's managers exist, as Cloud Hypervisor loads the payload.
        for field in PAYLOAD_FILES:
            path = payload.get(field)
            if path and not self._file_exists(path):
                return (_PAYLOAD_FILE_ERRORS[field], NO_SUCH_FILE)
        return ()

    def _transition(self, action: str) -> None:
        if not self.booted:
            # No VM object (never booted or shut down): Cloud Hypervisor's VmNotRunning,
            # a 500 even when no config exists at all.
            raise self._refused(action, NOT_RUNNING)
        assert self.state is not None
        sources, target, failure = _TRANSITIONS[action]
        if self.state not in sources:
            raise self._refused(
                action,
                failure,
                f"invalid VM state transition: {self.state.value} to {target.value}",
            )
        self._set_state(target)

    def _set_state(self, state: VmState) -> None:
        self.state = state
        if state is VmState.SHUTDOWN:
            self._present_vcpus = 0
            self._removal_target = self._eject_at = None
            self._hotplug_requested = self._plugged = self._plug_from = 0

    def _info(self) -> dict[str, Any]:
        if self.config is None or self.state is None:
            raise self._not_created("vm.info")
        state = self.state
        if state is VmState.SHUTDOWN and not self.knobs.report_shutdown_state:
            state = VmState.CREATED
        # No copy of the config: the answer is serialised at once (_dispatch), so
        # nothing can alias the model's state through it.
        info: dict[str, Any] = {
            "config": self.config,
            "state": state.value,
            "device_tree": {} if self.booted else None,
        }
        if self.knobs.report_memory_actual_size:
            info["memory_actual_size"] = self.memory_actual_size
        return _without_nulls(info) if self.knobs.omits_null_fields else info

    def _resize(self, request: dict[str, Any]) -> None:
        vcpus = _uint(request.get("desired_vcpus"), "desired_vcpus", U32_MAX)
        ram = _uint(request.get("desired_ram"), "desired_ram", U64_MAX)
        balloon = _uint(request.get("desired_balloon"), "desired_balloon", U64_MAX)
        if self.config is None:
            raise self._not_created("vm.resize")
        if not self.booted:
            self._cold_resize(vcpus, ram, balloon)
            return
        if vcpus is not None:
            self._resize_vcpus(vcpus)
        if ram is not None:
            self._resize_memory(ram)
        if balloon is not None:
            self._resize_balloon(balloon)

    def _cold_resize(self, vcpus: int | None, ram: int | None, balloon: int | None) -> None:
        # Cloud Hypervisor edits the stored config of a VM that is not running, unchecked.
        assert self.config is not None
        if vcpus is not None:
            self.config["cpus"]["boot_vcpus"] = vcpus
        if ram is not None:
            self.config["memory"]["size"] = ram
        if balloon is not None and isinstance(self.config.get("balloon"), dict):
            self.config["balloon"]["size"] = balloon

    def _resize_vcpus(self, desired: int) -> None:
        assert self.config is not None
        cpus = self.config["cpus"]
        pending = self._removal_target is not None
        if desired == self._present_vcpus and not (pending and self.knobs.strict_pending_removal):
            # CpuManager: nothing to do; the config still records the request.
            cpus["boot_vcpus"] = desired
            return
        if desired == 0:
            raise self._refused("vm.resize", "Error from CPU manager", "Requested zero vCPUs")
        if pending:
            raise _ApiError(429, TOO_MANY_REQUESTS)
        if desired > cpus["max_vcpus"]:
            raise self._refused(
                "vm.resize", "Error from CPU manager", "Requested vCPUs exceed maximum"
            )
        if desired > self._present_vcpus:
            self._present_vcpus = desired
        else:
            self._removal_target = desired
            self._eject_at = self._guest_clock + self.knobs.eject_delay_s
        cpus["boot_vcpus"] = desired
        self.advance(self._last_now)

    def _resize_memory(self, desired: int) -> None:
        assert self.config is not None
        memory = self.config["memory"]
        boot = memory["size"]
        if memory["hotplug_method"] != "VirtioMem":
            raise self._refused(
                "vm.resize",
                "Memory manager error",
                "ACPI memory hotplug is not simulated (boot with hotplug_method VirtioMem)",
            )
        if desired < boot and not self.knobs.below_boot_refused:
            # Before v52 MemoryManager only acts on desired_ram >= boot size, and Vm then
            # clears hotplugged_size: a 204 that leaves the device's requested size (and
            # the guest) as they were, so re-asking for that size is "identical".
            memory["hotplugged_size"] = None
            return
        if desired < boot:
            raise self._refused(
                "vm.resize",
                "Memory manager error",
                f"Invalid resize request: desired_size = {desired} below boot size = {boot}",
            )
        region = memory["hotplug_size"] or 0
        if not region:
            raise self._refused(
                "vm.resize", "Memory manager error", "No virtio-mem resizing handler found"
            )
        size = desired - boot
        # virtio-mem's own checks, in its order.
        if size == self._hotplug_requested:
            problem = f"new size {size:#x} and requested_size are identical"
        elif size > region:
            problem = f"new size {size:#x} is bigger than region_size {region:#x}"
        elif size % VIRTIO_MEM_BLOCK:
            problem = f"new size {size:#x} is not aligned on block_size {VIRTIO_MEM_BLOCK:#x}"
        else:
            problem = ""
        if problem:
            raise self._refused(
                "vm.resize",
                "Memory manager error",
                "Failed to virtio-mem resize",
                "Resize invalid argument",
                f"Failed to update virtio configuration: {problem}",
            )
        self._hotplug_requested = size
        self._plug_from, self._plug_since = self._plugged, self._guest_clock
        self._unplugged_before = self._unplugged
        # None, not 0, once back at the boot size: that is what Cloud Hypervisor stores.
        memory["hotplugged_size"] = size or None
        self.advance(self._last_now)

    def _resize_balloon(self, desired: int) -> None:
        assert self.config is not None
        balloon = self.config.get("balloon")
        if not isinstance(balloon, dict):
            raise self._refused(
                "vm.resize",
                "Error from device manager",
                "No balloon device: Can't resize the balloon",
            )
        total = self._boot_memory + self._plugged
        if desired > total:
            raise self._refused(
                "vm.resize",
                "Error from device manager",
                f"desired_balloon ({desired}) exceeds the guest memory ({total})",
            )
        balloon["size"] = desired
