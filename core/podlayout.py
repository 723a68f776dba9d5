"""Where a VM pod keeps its VMM's API socket, on both sides of the kubelet.

The VM pod mounts an emptyDir named :data:`VMM_VOLUME` at :data:`VMM_MOUNT_PATH` and its
VMM listens on :data:`VMM_SOCKET_NAME` there. Every kubelet keeps an emptyDir at
``<pods root>/<pod uid>/volumes/kubernetes.io~empty-dir/<volume>``, so the node daemon finds
the same socket from the host side. The pod builder, the node daemon and the simulated
kubelet all take these facts from here, and nothing that ships takes them from the test bench.
"""

from __future__ import annotations

VMM_VOLUME = "vmm"
VMM_MOUNT_PATH = "/var/run/chscale"
VMM_SOCKET_NAME = "ch.sock"
# The VM pod's container gets its own pod uid in this variable (downward API, fieldRef
# metadata.uid); the node daemon checks the VMM behind a socket by it (ADR 0011).
POD_UID_ENV = "CHSCALE_POD_UID"
# The real kubelet's default root directory is /var/lib/kubelet.
DEFAULT_PODS_ROOT = "/var/lib/kubelet/pods"

_EMPTY_DIR = "volumes/kubernetes.io~empty-dir"


class PodLayoutError(ValueError):
    """A pod uid or root that cannot name a directory (never from a real API server)."""


def vmm_socket_dir(pods_root: str, pod_uid: str) -> str:
    """The host-side directory of pod ``pod_uid``'s ``vmm`` emptyDir."""
    if not pod_uid or "/" in pod_uid or pod_uid in (".", ".."):
        raise PodLayoutError(f"pod uid {pod_uid!r} cannot name a directory")
    if not pods_root:
        raise PodLayoutError("the pods root directory is empty")
    return f"{pods_root.rstrip('/')}/{pod_uid}/{_EMPTY_DIR}/{VMM_VOLUME}"


def vmm_socket_path(pods_root: str, pod_uid: str) -> str:
    """Where the VMM of pod ``pod_uid`` listens, seen from the node."""
    return f"{vmm_socket_dir(pods_root, pod_uid)}/{VMM_SOCKET_NAME}"


def vmm_socket_in_pod() -> str:
    """Where the VMM listens, seen from inside the pod (its ``--api-socket`` path)."""
    return f"{VMM_MOUNT_PATH}/{VMM_SOCKET_NAME}"
