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
  so a caller that only handles requests still sees progress.

The guest only makes progress while it runs: time spent ``Paused`` does not count
(``progress_while_paused`` changes that). Progress is measured on a *guest clock* that
accumulates running time, so pause/resume needs no special case in the plug arithmetic.

VM life cycle: (no VM) -vm.create-> Created -vm.boot-> Running <-pause/resume-> Paused,
Running|Paused -vm.shutdown-> Shutdown -vm.boot-> Running. The table ``_TRANSITIONS`` is
the whole graph; any other (state, action) pair is a 500 naming both. Like Cloud
Hypervisor, ``vm.info`` shows a shut-down VM as ``Created`` (the VM object is gone, its
config stays and can boot again) unless ``report_shutdown_state`` is set.

``vm.resize`` applies its parts in Cloud Hypervisor's order (vCPUs, memory, balloon) and
is not atomic: a part that fails answers 500 but the parts before it stay applied. On a
VM that is created but not booted (or shut down) a resize only edits the stored config,
as Cloud Hypervisor does: ``desired_ram`` then becomes the boot size.

Version knobs (``api_version``) select the behaviour of older releases: the status for
"VM not created" (404 from v53, 500 before), error bodies (JSON array of strings from
v47, plain text before) and ``memory_actual_size`` in ``vm.info`` (from v52).
"""

from __future__ import annotations

import copy
import enum
import json
from collections import deque
from typing import Any

import attrs

MIB = 1 << 20
API_PREFIX = "/api/v1/"
# A virtio-mem region is made of Linux memory blocks; the device plugs 2 MiB blocks.
VIRTIO_MEM_REGION_ALIGN = 128 * MIB
VIRTIO_MEM_BLOCK = 2 * MIB
DEFAULT_BOOT_MEMORY = 512 * MIB
JSON = "application/json"
# Float slack so that advance(next_event()) always sees the event as due.
_CLOCK_SLACK = 1e-9

# The first API version with each behaviour (Cloud Hypervisor release numbers).
JSON_ERRORS_SINCE = 47
MEMORY_ACTUAL_SIZE_SINCE = 52
NOT_CREATED_404_SINCE = 53
LATEST_API_VERSION = 53


class VmState(enum.Enum):
    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


@attrs.frozen(slots=True)
class Response:
    """One HTTP answer. ``delay`` and ``hang`` are instructions for the server, not
    part of the wire: wait ``delay`` seconds before answering, or never answer."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON
    delay: float = 0.0
    hang: bool = False

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@attrs.frozen(slots=True)
class Knobs:
    api_version: int = LATEST_API_VERSION
    eject_delay_s: float = 0.5
    plug_rate: float | None = None
    latency_s: float = 0.0
    progress_while_paused: bool = False
    # Cloud Hypervisor drops the VM object on vm.shutdown and then reports "Created";
    # True reports "Shutdown" instead, to exercise a consumer's handling of that state.
    report_shutdown_state: bool = False
    build_version: str = "v53.0-chscale-sim"

    def __attrs_post_init__(self) -> None:
        if self.eject_delay_s < 0:
            raise ValueError(f"eject_delay_s must be >= 0, got {self.eject_delay_s}")
        if self.plug_rate is not None and self.plug_rate <= 0:
            raise ValueError(f"plug_rate must be > 0 bytes/s or None, got {self.plug_rate}")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")

    @property
    def json_errors(self) -> bool:
        return self.api_version >= JSON_ERRORS_SINCE

    @property
    def reports_memory_actual_size(self) -> bool:
        return self.api_version >= MEMORY_ACTUAL_SIZE_SINCE

    @property
    def not_created_status(self) -> int:
        return 404 if self.api_version >= NOT_CREATED_404_SINCE else 500


class _ApiError(Exception):
    """A refused request: status plus the message chain Cloud Hypervisor would print
    (outermost first)."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(": ".join(messages))
        self.status = status
        self.messages = messages


GET, PUT = "GET", "PUT"
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
}
# Endpoints routed through Cloud Hypervisor's generic action handler: a method other
# than GET/PUT gets a bare 400 there, where the dedicated handlers answer with a body.
_ACTION_HANDLERS = frozenset({"vm.boot", "vm.pause", "vm.resume", "vm.shutdown", "vm.resize"})
_NO_BODY = frozenset({"vm.boot", "vm.pause", "vm.resume", "vm.shutdown"})

# action -> (states it may start from, state it leads to, what failed in CH's words)
_TRANSITIONS: dict[str, tuple[frozenset[VmState], VmState, str]] = {
    "vm.boot": (
        frozenset({VmState.CREATED, VmState.SHUTDOWN}),
        VmState.RUNNING,
        "The VM could not boot",
    ),
    "vm.pause": (frozenset({VmState.RUNNING}), VmState.PAUSED, "The VM could not be paused"),
    "vm.resume": (frozenset({VmState.PAUSED}), VmState.RUNNING, "The VM could not resume"),
    "vm.shutdown": (
        frozenset({VmState.RUNNING, VmState.PAUSED}),
        VmState.SHUTDOWN,
        "The VM could not shut down",
    ),
}
_BOOTED = frozenset({VmState.RUNNING, VmState.PAUSED})
_HOTPLUG_METHODS = {"acpi": "Acpi", "virtiomem": "VirtioMem", "virtio-mem": "VirtioMem"}


def _normal_hotplug_method(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in _HOTPLUG_METHODS:
        raise _ApiError(400, "Failed to deserialize JSON", f"memory.hotplug_method: {value!r}")
    return _HOTPLUG_METHODS[value.lower()]


def _uint(value: Any, field: str, optional: bool = True) -> int | None:
    """serde's view of an unsigned integer field: wrong type is a 400."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _ApiError(
            400,
            "Failed to deserialize JSON",
            f"{field}: expected an unsigned integer, got {value!r}",
        )
    return value


class VmmModel:
    """One VMM process: the API, the VM's state and the guest's asynchronous progress."""

    def __init__(self, knobs: Knobs | None = None, pid: int = 0, now: float = 0.0) -> None:
        self.knobs = knobs or Knobs()
        self.pid = pid
        self.state: VmState | None = None
        self.config: dict[str, Any] | None = None
        self.vmm_shutdown_requested = False
        self.hang = False
        # vCPUs: present = those the guest has (incl. those marked for removal).
        self._present_vcpus = 0
        self._eject_at: float | None = None  # guest-clock time of the pending ejection
        # virtio-mem: bytes requested (config.memory.hotplugged_size) and plugged.
        self._hotplug_requested: int | None = None
        self._plugged = 0
        self._plug_from = 0  # plugged bytes when the current plug/unplug began
        self._plug_since = 0.0  # guest-clock time it began
        self._last_now = now
        self._guest_clock = 0.0
        self._forced: dict[str, deque[Response]] = {}

    # ---- knobs for tests and simulations -------------------------------------------

    def inject(self, endpoint: str, response: Response, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``endpoint`` (e.g. ``"vm.resize"``) with
        ``response`` instead of processing them (nothing changes in the VM)."""
        if endpoint not in _ENDPOINTS:
            raise ValueError(f"inject: unknown endpoint {endpoint!r}; known: {sorted(_ENDPOINTS)}")
        self._forced.setdefault(endpoint, deque()).extend([response] * times)

    def error(self, status: int, *messages: str) -> Response:
        """An error response in the format of the configured API version."""
        return self._error(_ApiError(status, *messages))

    # ---- introspection --------------------------------------------------------------

    @property
    def requested_vcpus(self) -> int:
        return int(self.config["cpus"]["boot_vcpus"]) if self.config else 0

    @property
    def present_vcpus(self) -> int:
        return self._present_vcpus

    @property
    def pending_vcpu_removal(self) -> int:
        return max(0, self._present_vcpus - self.requested_vcpus) if self._booted else 0

    @property
    def plugged_memory(self) -> int:
        return self._plugged

    @property
    def requested_hotplug(self) -> int:
        return self._hotplug_requested or 0

    @property
    def memory_actual_size(self) -> int:
        """Cloud Hypervisor's figure: boot size minus the balloon plus what virtio-mem has
        plugged; the boot size alone while no VM runs."""
        if not self._booted:
            return self._boot_memory
        return max(0, self._boot_memory - self._balloon) + self._plugged

    @property
    def _balloon(self) -> int:
        balloon = self.config.get("balloon") if self.config else None
        return int(balloon.get("size") or 0) if isinstance(balloon, dict) else 0

    @property
    def _booted(self) -> bool:
        return self.state in _BOOTED

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
        if now > self._last_now:
            if self._guest_runs:
                self._guest_clock += now - self._last_now
            self._last_now = now
        if self._eject_at is not None and self._guest_clock + _CLOCK_SLACK >= self._eject_at:
            self._present_vcpus = self.requested_vcpus
            self._eject_at = None
        self._plugged = self._plug_position(self._guest_clock)

    def next_event(self) -> float | None:
        """When (caller's time) the guest will next change on its own, or None. While the
        guest does not run nothing is due."""
        if not self._guest_runs:
            return None
        due: list[float] = []
        if self._eject_at is not None:
            due.append(self._eject_at)
        target = self.requested_hotplug
        if self._plugged != target and self.knobs.plug_rate is not None:
            moved = abs(self._plugged - self._plug_from)
            step = min(VIRTIO_MEM_BLOCK, abs(target - self._plugged))
            due.append(self._plug_since + (moved + step) / self.knobs.plug_rate)
        if not due:
            return None
        return self._last_now + max(0.0, min(due) - self._guest_clock)

    def _plug_position(self, guest_clock: float) -> int:
        target = self.requested_hotplug
        if self._plugged == target:
            return target
        distance = abs(target - self._plug_from)
        if self.knobs.plug_rate is None:
            moved = distance
        else:
            elapsed = guest_clock - self._plug_since
            # Whole blocks only: the guest plugs 2 MiB at a time.
            # Half a byte of slack so that advance(next_event()) always lands the block
            # despite float rounding.
            moved = int(elapsed * self.knobs.plug_rate + 0.5) // VIRTIO_MEM_BLOCK
            moved *= VIRTIO_MEM_BLOCK
            moved = min(moved, distance)
        return self._plug_from + moved if target > self._plug_from else self._plug_from - moved

    # ---- the API ------------------------------------------------------------------

    def handle(self, now: float, method: str, path: str, body: bytes | None) -> Response:
        self.advance(now)
        if self.hang:
            return Response(status=0, body=b"", hang=True)
        response = self._route(method.upper(), path, body or None)
        if self.knobs.latency_s and not response.delay:
            response = attrs.evolve(response, delay=self.knobs.latency_s)
        return response

    def _route(self, method: str, path: str, body: bytes | None) -> Response:
        path = path.split("?", 1)[0]
        endpoint = path[len(API_PREFIX) :] if path.startswith(API_PREFIX) else None
        if endpoint not in _ENDPOINTS:
            return self._error(_ApiError(404, "Not Found"))
        assert endpoint is not None
        if method != _ENDPOINTS[endpoint]:
            if endpoint in _ACTION_HANDLERS and method not in (GET, PUT):
                return Response(status=400)
            return self._error(_ApiError(400, "Bad Request"))
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
            # Cloud Hypervisor deletes the VM (shutting it down first), then exits.
            self.vmm_shutdown_requested = True
            if self._booted:
                self._set_state(VmState.SHUTDOWN)
            return Response(status=200, body=b"")
        if endpoint == "vm.create":
            if body is None:
                return Response(status=400)
            self._create(self._parse(body))
            return Response(status=204)
        if endpoint == "vm.info":
            return self._json(200, self._info())
        if endpoint == "vm.resize":
            if body is None:
                raise _ApiError(400, "Bad Request")
            self._resize(self._parse(body))
            return Response(status=204)
        self._transition(endpoint)
        return Response(status=204)

    def _error(self, exc: _ApiError) -> Response:
        if self.knobs.json_errors:
            return Response(status=exc.status, body=json.dumps(list(exc.messages)).encode())
        return Response(status=exc.status, body=": ".join(exc.messages).encode())

    @staticmethod
    def _json(status: int, value: Any) -> Response:
        return Response(status=status, body=json.dumps(value).encode())

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _ApiError(400, "Failed to deserialize JSON", str(exc)) from None
        if not isinstance(value, dict):
            raise _ApiError(400, "Failed to deserialize JSON", "expected a JSON object")
        return value

    def _not_created(self, what: str) -> _ApiError:
        return _ApiError(self.knobs.not_created_status, "Error from API", what, "VM is not created")

    # ---- endpoints ----------------------------------------------------------------

    def _ping(self) -> dict[str, Any]:
        version = self.knobs.build_version.lstrip("v").split("-", 1)[0]
        return {
            "build_version": self.knobs.build_version,
            "version": version,
            "pid": self.pid,
            "features": [],
        }

    def _create(self, raw: dict[str, Any]) -> None:
        if self.config is not None:
            raise _ApiError(
                500, "Error from API", "The VM could not be created", "VM already created"
            )
        config = copy.deepcopy(raw)
        cpus = config.get("cpus") or {}
        if not isinstance(cpus, dict):
            raise _ApiError(400, "Failed to deserialize JSON", "cpus: expected an object")
        boot = _uint(cpus.get("boot_vcpus", 1), "cpus.boot_vcpus", optional=False)
        top = _uint(cpus.get("max_vcpus", boot), "cpus.max_vcpus", optional=False)
        memory = config.get("memory") or {}
        if not isinstance(memory, dict):
            raise _ApiError(400, "Failed to deserialize JSON", "memory: expected an object")
        size = _uint(memory.get("size", DEFAULT_BOOT_MEMORY), "memory.size", optional=False)
        method = _normal_hotplug_method(memory.get("hotplug_method", "Acpi"))
        hotplug_size = _uint(memory.get("hotplug_size"), "memory.hotplug_size")
        assert boot is not None and top is not None and size is not None

        def invalid(message: str) -> _ApiError:
            return _ApiError(500, "Error from API", "The VM could not be created", message)

        if boot < 1:
            raise invalid("cpus.boot_vcpus must be at least 1")
        if top < boot:
            raise invalid(f"cpus.max_vcpus ({top}) is lower than cpus.boot_vcpus ({boot})")
        if size == 0:
            raise invalid("memory.size must be greater than 0")
        if method == "VirtioMem" and hotplug_size and hotplug_size % VIRTIO_MEM_REGION_ALIGN:
            raise invalid(
                f"memory.hotplug_size ({hotplug_size}) must be a multiple of "
                f"{VIRTIO_MEM_REGION_ALIGN} bytes (128 MiB) for virtio-mem"
            )
        cpus.update(boot_vcpus=boot, max_vcpus=top)
        cpus.setdefault("kvm_hyperv", False)
        cpus.setdefault("max_phys_bits", 46)
        memory.update(size=size, hotplug_method=method, hotplug_size=hotplug_size)
        memory.setdefault("hotplugged_size", None)
        for flag, default in (
            ("mergeable", False),
            ("shared", False),
            ("hugepages", False),
            ("prefault", False),
            ("thp", True),
        ):
            memory.setdefault(flag, default)
        config["cpus"], config["memory"] = cpus, memory
        self.config = config
        self.state = VmState.CREATED
        self._hotplug_requested = memory["hotplugged_size"]

    def _transition(self, action: str) -> None:
        sources, target, failure = _TRANSITIONS[action]
        if self.state is None:
            raise self._not_created(failure)
        if self.state not in sources:
            raise _ApiError(
                500,
                "Error from API",
                failure,
                f"Invalid transition from {self.state.value} to {target.value}",
            )
        if action == "vm.boot":
            self._boot()
        self._set_state(target)

    def _boot(self) -> None:
        assert self.config is not None
        self._present_vcpus = self.requested_vcpus
        self._eject_at = None
        # A (re)boot plugs what the config asks for from the start, as a fresh guest does.
        self._plugged = self._plug_from = self.requested_hotplug

    def _set_state(self, state: VmState) -> None:
        self.state = state
        if state is VmState.SHUTDOWN:
            self._present_vcpus = 0
            self._eject_at = None
            self._plugged = self._plug_from = 0

    def _info(self) -> dict[str, Any]:
        if self.config is None or self.state is None:
            raise self._not_created("The VM information could not be retrieved")
        state = self.state
        if state is VmState.SHUTDOWN and not self.knobs.report_shutdown_state:
            state = VmState.CREATED
        info: dict[str, Any] = {
            "config": copy.deepcopy(self.config),
            "state": state.value,
            "device_tree": {} if self._booted else None,
        }
        if self.knobs.reports_memory_actual_size:
            info["memory_actual_size"] = self.memory_actual_size
        return info

    def _resize(self, request: dict[str, Any]) -> None:
        vcpus = _uint(request.get("desired_vcpus"), "desired_vcpus")
        ram = _uint(request.get("desired_ram"), "desired_ram")
        balloon = _uint(request.get("desired_balloon"), "desired_balloon")
        if self.config is None:
            raise self._not_created("The VM could not be resized")
        if not self._booted:
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
        if desired == cpus["boot_vcpus"]:
            return
        if desired == 0:
            raise _ApiError(
                500, "Error from API", "The VM could not be resized", "desired_vcpus must be >= 1"
            )
        if self.pending_vcpu_removal:
            raise _ApiError(
                429,
                "Too Many Requests",
                f"{self.pending_vcpu_removal} vCPU(s) still pending removal in the guest",
            )
        if desired > cpus["max_vcpus"]:
            raise _ApiError(
                500,
                "Error from API",
                "The VM could not be resized",
                f"desired_vcpus ({desired}) exceeds max_vcpus ({cpus['max_vcpus']})",
            )
        cpus["boot_vcpus"] = desired
        if desired > self._present_vcpus:
            self._present_vcpus = desired
        else:
            self._eject_at = self._guest_clock + self.knobs.eject_delay_s
            self.advance(self._last_now)

    def _resize_memory(self, desired: int) -> None:
        assert self.config is not None
        memory = self.config["memory"]

        def refuse(message: str) -> _ApiError:
            return _ApiError(
                500,
                "Error from API",
                "The VM could not be resized",
                "Error resizing memory",
                message,
            )

        region = memory.get("hotplug_size") or 0
        if memory["hotplug_method"] != "VirtioMem" or not region:
            raise refuse("memory hotplug is not enabled (no virtio-mem hotplug_size at boot)")
        delta = desired - memory["size"]
        if delta < 0:
            raise refuse(
                f"desired_ram ({desired}) is below the boot memory size ({memory['size']})"
            )
        if delta > region:
            raise refuse(
                f"desired_ram ({desired}) exceeds boot size plus the virtio-mem region "
                f"({memory['size'] + region})"
            )
        if delta % VIRTIO_MEM_BLOCK:
            raise refuse(
                f"desired_ram ({desired}) minus the boot size is not a multiple of the "
                f"virtio-mem block size ({VIRTIO_MEM_BLOCK})"
            )
        if delta == self.requested_hotplug:
            raise refuse(f"virtio-mem already set to {delta} bytes (requested size unchanged)")
        memory["hotplugged_size"] = delta
        self._hotplug_requested = delta
        self._plug_from, self._plug_since = self._plugged, self._guest_clock
        self.advance(self._last_now)

    def _resize_balloon(self, desired: int) -> None:
        assert self.config is not None
        balloon = self.config.get("balloon")
        if not isinstance(balloon, dict):
            raise _ApiError(
                500, "Error from API", "The VM could not be resized", "No balloon device configured"
            )
        if desired > self.memory_actual_size:
            raise _ApiError(
                500,
                "Error from API",
                "The VM could not be resized",
                f"desired_balloon ({desired}) exceeds the guest memory ({self.memory_actual_size})",
            )
        balloon["size"] = desired
