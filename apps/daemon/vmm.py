"""The daemon's view of one VMM: the Cloud Hypervisor client reduced to what the kernel
reads (:class:`core.VmmView`) and the two things it asks (boot, resize)."""

from __future__ import annotations

from typing import Any

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.errors import (
    CloudHypervisorError,
    VmmBusy,
    VmmUnreachable,
    VmmUntrusted,
    VmNotCreated,
)
from apps.daemon.daemon import VmmCallFailed
from core import BootVmm, VmmCallError, VmmCallErrorKind, VmmState, VmmView

_STATES = {
    "Created": VmmState.CREATED,
    "Running": VmmState.RUNNING,
    "Paused": VmmState.PAUSED,
    "Shutdown": VmmState.SHUTDOWN,
}


class BootDefaults:
    """Kernel, initramfs and command line when the VM spec names none."""

    def __init__(
        self, kernel: str | None = None, initramfs: str | None = None, cmdline: str | None = None
    ) -> None:
        self.kernel, self.initramfs, self.cmdline = kernel, initramfs, cmdline


def vm_config(
    boot: BootVmm, spec_boot: dict[str, Any] | None, defaults: BootDefaults
) -> dict[str, Any]:
    """The ``vm.create`` body: resizable up to the ceilings, memory by virtio-mem."""
    memory: dict[str, Any] = {"size": boot.memory}
    if boot.hotplug_size:
        memory.update(hotplug_method="VirtioMem", hotplug_size=boot.hotplug_size)
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": boot.boot_vcpus, "max_vcpus": boot.max_vcpus},
        "memory": memory,
        "serial": {"mode": "Null"},
        "console": {"mode": "Off"},
    }
    spec_boot = spec_boot or {}
    payload = {
        "kernel": spec_boot.get("kernel") or defaults.kernel,
        "initramfs": spec_boot.get("initramfs") or defaults.initramfs,
        "cmdline": spec_boot.get("cmdline") or defaults.cmdline,
    }
    payload = {k: v for k, v in payload.items() if v}
    if payload:
        config["payload"] = payload
    return config


NO_KERNEL = (
    "no guest kernel to boot: set spec.instance.boot.kernel, or start chscale-daemon with --kernel"
)


class Vmm:
    def __init__(
        self,
        socket_path: str,
        spec_boot: dict[str, Any] | None,
        defaults: BootDefaults,
        timeout: float = 5.0,
        version: str | None = None,
        client: CloudHypervisorClient | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.client = client or CloudHypervisorClient(socket_path, timeout=timeout)
        self.spec_boot = spec_boot
        self.defaults = defaults
        # vmm.ping's version as status already records it; read once when unknown.
        self.version = version

    def _version(self) -> str | None:
        if self.version is None:
            try:
                self.version = self.client.ping().version
            except CloudHypervisorError:
                return None  # unknown counts as "cannot report unplugged memory"
        return self.version

    def view(self) -> VmmView:
        try:
            info = self.client.info()
        except VmNotCreated:
            return VmmView(VmmState.NOT_CREATED)
        except VmmUnreachable as exc:
            return VmmView(VmmState.UNREACHABLE, detail=str(exc))
        except VmmUntrusted as exc:
            return VmmView(VmmState.UNTRUSTED, detail=str(exc))
        except CloudHypervisorError as exc:
            return VmmView(VmmState.UNREACHABLE, detail=str(exc))
        cpus, memory = info.config.cpus, info.config.memory
        boot_memory = memory.size
        hotplugged = memory.hotplugged_size or 0
        return VmmView(
            state=_STATES.get(info.state, VmmState.UNREACHABLE),
            vcpus=cpus.boot_vcpus,
            max_vcpus=cpus.max_vcpus,
            boot_memory=boot_memory,
            hotplug_size=memory.hotplug_size or 0,
            requested_memory=boot_memory + hotplugged,
            actual_memory=info.memory_actual_size,
            version=self._version(),
        )

    def boot(self, action: BootVmm) -> None:
        config = vm_config(action, self.spec_boot, self.defaults)
        if not (config.get("payload") or {}).get("kernel"):
            # Cloud Hypervisor would accept the config and refuse the boot with a 500.
            raise VmmCallFailed(VmmCallError(VmmCallErrorKind.INVALID, NO_KERNEL))
        try:
            if self.view().state is VmmState.CREATED:
                # A config from an earlier attempt (failed boot, or a daemon restart
                # between create and boot): delete it, so the boot uses today's spec.
                self.client.delete()
            self.client.create(config)
            self.client.boot()
        except CloudHypervisorError as exc:
            raise VmmCallFailed(VmmCallError(VmmCallErrorKind.FAILED, str(exc))) from exc

    def resize(self, vcpus: int | None, memory: int | None) -> None:
        try:
            self.client.resize(desired_vcpus=vcpus, desired_ram=memory)
        except VmmBusy as exc:
            raise VmmCallFailed(VmmCallError(VmmCallErrorKind.BUSY, str(exc))) from exc
        except CloudHypervisorError as exc:
            raise VmmCallFailed(VmmCallError(VmmCallErrorKind.FAILED, str(exc))) from exc
