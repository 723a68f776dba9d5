"""Every number the resize contract names, named once.

RESIZE.md sections 2 and 6 fix these; anything that needs one imports it from here.
Values an operator may want to change (the overhead, the tolerance, the backoff) are the
defaults of :class:`core.config.KernelConfig`, which is what the kernel actually reads.
"""

from __future__ import annotations

from fractions import Fraction

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

MILLICORES_PER_VCPU = 1000

# Memory the VMM process needs on top of guest RAM (RESIZE.md §2, from the seed).
POD_MEMORY_OVERHEAD = 256 * MiB

# Kubernetes may round what it reports as a pod's actual memory; Cloud Hypervisor does not.
POD_MEMORY_TOLERANCE = Fraction(5, 100)

# virtio-mem plugs guest memory in 2 MiB blocks; the hotplug region is sized in 128 MiB units.
GUEST_MEMORY_ALIGNMENT = 2 * MiB
HOTPLUG_REGION_ALIGNMENT = 128 * MiB

# Kubernetes quantities are int64 and the pod must hold the overhead on top of the guest:
# a larger size is not an allocation but a malformed object (refused at admission).
MAX_GUEST_MEMORY = 1 << 62

# Cloud Hypervisor's CpusConfig holds boot_vcpus and max_vcpus in a u8 (docs/cpu.md): more
# vCPUs cannot boot, and a larger count would overflow int64 fields of our own status.
MAX_VCPUS = 255

# Hotplug ceilings when the spec does not name them (RESIZE.md §1), capped at MAX_VCPUS.
DEFAULT_MAX_VCPUS_FACTOR = 2
DEFAULT_MAX_MEMORY_FACTOR = 5

# Reconciles the controller and each node daemon run at once (--workers), and the
# simulation's model of them. A reconcile waits on one to three API or VMM round trips in
# a row, so with four workers a burst of 1,000 resizes queued 26 s in the controller
# (p50) on this 2-core machine; sixteen took the burst from 104 s to 77 s, and sixty-four
# made it slower again (98 s: the workers' requests crowd the client's own patches out of
# a saturated API server). ADR 0020.
RECONCILE_WORKERS = 16

# The container in the VM pod that runs the VMM; the pod step resizes this one.
VM_CONTAINER = "vm-manager"

API_GROUP = "cloudhypervisor.quill.today"
API_VERSION = "v1beta1"
KIND = "VirtualMachine"
PLURAL = "virtualmachines"
FINALIZER = f"{API_GROUP}/vm-protection"
# Labels that tie a VM pod to its VM; the webhook selects pods by the first.
VM_NAME_LABEL = f"{API_GROUP}/vm"
VM_UID_LABEL = f"{API_GROUP}/vm-uid"
