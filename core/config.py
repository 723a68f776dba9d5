"""The kernel's tunables, with the contract's values as defaults."""

from __future__ import annotations

from fractions import Fraction

from attrs import frozen

from core.constants import POD_MEMORY_OVERHEAD, POD_MEMORY_TOLERANCE


@frozen
class KernelConfig:
    pod_memory_overhead: int = POD_MEMORY_OVERHEAD
    pod_memory_tolerance: Fraction = POD_MEMORY_TOLERANCE
    # Backoff for failed VMM calls: base * 2**attempts, capped.
    vmm_retry_base_s: float = 0.2
    vmm_retry_cap_s: float = 30.0
    # A pending vCPU removal (429) clears when the guest ejects; poll it briskly.
    vmm_busy_retry_s: float = 0.1
    # The guest onlines memory asynchronously and vm.info is not watchable: poll.
    vmm_poll_s: float = 0.05
    unreachable_retry_s: float = 2.0

    def vmm_backoff(self, attempts: int) -> float:
        return min(self.vmm_retry_base_s * (2 ** min(attempts, 32)), self.vmm_retry_cap_s)


DEFAULT_CONFIG = KernelConfig()
