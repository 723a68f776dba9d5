"""The kernel's tunables, with the contract's values as defaults.

Every wait of RESIZE.md 4b has its deadline here, named once; the controller and the
daemon expose each as a command-line flag (``DEADLINE_FLAGS``, see apps/common/runtime.py).
"""

from __future__ import annotations

from fractions import Fraction

from attrs import fields, frozen

from core.constants import POD_MEMORY_OVERHEAD, POD_MEMORY_TOLERANCE


@frozen
class KernelConfig:
    pod_memory_overhead: int = POD_MEMORY_OVERHEAD
    pod_memory_tolerance: Fraction = POD_MEMORY_TOLERANCE
    # Backoff for failed VMM calls: base * 2**attempts, capped.
    vmm_retry_base_s: float = 0.2
    vmm_retry_cap_s: float = 30.0
    # A pending vCPU removal (429) clears when the guest ejects: probe it, first after this
    # long, then after as long again as waited so far, capped (busy_after).
    vmm_busy_retry_s: float = 0.02
    # The guest plugs memory asynchronously and vm.info is not watchable: poll, first
    # after this long, then at half the time waited so far (capped): polls grow 1.5x.
    vmm_poll_s: float = 0.05
    wait_poll_cap_s: float = 5.0
    unreachable_retry_s: float = 2.0
    # --- deadlines (RESIZE.md 4b), seconds from the start of the wait ---
    # The kubelet's part of a pod resize (accepted, then actuated; Deferred and Error too).
    pod_resize_deadline_s: float = 120.0
    # The guest plugging or unplugging virtio-mem memory after the VMM accepted.
    guest_memory_deadline_s: float = 60.0
    # The guest ejecting vCPUs (every vCPU request answers 429 until it has).
    vcpu_removal_deadline_s: float = 60.0
    # The VMM refusing vm.resize with errors other than 429.
    vmm_resize_deadline_s: float = 60.0
    # Booting the VMM (vm.create + vm.boot failing).
    boot_deadline_s: float = 120.0
    # The VMM's API socket gone while its pod still runs (the VMM killed inside a running
    # container, or the socket removed): the daemon can neither see nor resize the guest.
    vmm_unreachable_deadline_s: float = 60.0

    def vmm_backoff(self, attempts: int) -> float:
        return min(self.vmm_retry_base_s * (2 ** min(attempts, 32)), self.vmm_retry_cap_s)

    def busy_after(self, busy_for: float, waited: float, deadline: float) -> float:
        """When to probe a pending vCPU removal again: ``busy_for`` seconds after the first
        429 of the wait, ``waited`` seconds into the wait. Timed, not counted in 429s: a
        count lives in status, and writing it was a status write per probe (ADR 0021).
        Base plus the time since the first 429: the probes come when base * 2**n after n
        429s in a row brought them."""
        after = min(self.vmm_busy_retry_s + busy_for, self.wait_poll_cap_s)
        return self._by_deadline(after, waited, deadline, self.vmm_busy_retry_s)

    def poll_after(self, waited: float, deadline: float) -> float:
        """When to look again, ``waited`` seconds into a wait: capped exponential (each
        poll 1.5x after the previous)."""
        after = min(max(self.vmm_poll_s, waited * 0.5), self.wait_poll_cap_s)
        return self._by_deadline(after, waited, deadline, self.vmm_poll_s)

    def at_deadline(self, waited: float, deadline: float) -> float:
        """When to look again, ``waited`` seconds into a wait in which everything but the
        deadline arrives as a watch event: just past the deadline, for its verdict."""
        return self._by_deadline(deadline, waited, deadline, self.vmm_poll_s)

    def _by_deadline(self, after: float, waited: float, deadline: float, least: float) -> float:
        """``after``, but no later than just past the deadline, so that the verdict comes
        on time, and never sooner than ``least``."""
        return max(min(after, deadline - waited + self.vmm_poll_s), least)


DEFAULT_CONFIG = KernelConfig()

# The deadline fields, each with its command-line flag (--pod-resize-deadline etc.).
DEADLINES = tuple(f.name for f in fields(KernelConfig) if f.name.endswith("_deadline_s"))
DEADLINE_FLAGS = {name: "--" + name.removesuffix("_s").replace("_", "-") for name in DEADLINES}
