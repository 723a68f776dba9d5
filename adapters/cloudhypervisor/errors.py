"""What can go wrong talking to a Cloud Hypervisor API socket.

The split follows what a caller does next: :class:`VmmUnreachable` (no process behind the
socket, or it does not answer: wait for it or report it), :class:`VmNotCreated` (the VMM
runs but holds no VM: create one), :class:`VmmBusy` (429, a vCPU removal is still pending
in the guest: retry later, it is not a failure), :class:`VmmError` (the VMM refused: its
message says why), :class:`VmmUntrusted` (the socket or the process behind it is not the
pod's own VMM: nothing was sent, and nothing must be until an operator looks; ADR 0011).
"""

from __future__ import annotations


class CloudHypervisorError(Exception):
    """Base of every error raised by :mod:`adapters.cloudhypervisor`."""

    def __init__(self, socket_path: str, endpoint: str, message: str) -> None:
        super().__init__(f"{endpoint} on {socket_path}: {message}")
        self.socket_path = socket_path
        self.endpoint = endpoint
        self.message = message


class VmmUnreachable(CloudHypervisorError):
    """The socket is missing, refuses connections, or the VMM did not answer in time."""


class VmmUntrusted(CloudHypervisorError):
    """The pod's socket cannot be trusted to lead to the pod's own VMM, so no request was
    sent. Not transient: a retry meets the same socket. The daemon reports it as a
    condition and an event on the VM and never calls the VMM behind it."""


class VmmSocketRefused(VmmUntrusted):
    """The socket path leaves the pod's directory (a symlink in any component below the
    pods root), or is not a socket, or is not owned as expected."""


class VmmIdentityMismatch(VmmUntrusted):
    """The process listening on the pod's socket is not the pod's VMM (its cgroup and its
    environment do not name the pod's uid), or its identity cannot be read."""


class VmmError(CloudHypervisorError):
    """The VMM answered with an error status; ``message`` is its error text."""

    def __init__(
        self,
        socket_path: str,
        endpoint: str,
        status: int,
        message: str,
        chain: tuple[str, ...] = (),
    ) -> None:
        super().__init__(socket_path, endpoint, f"{status} {message}")
        self.status = status
        self.message = message
        # The VMM's messages, outermost first (``message`` joins them with ": ").
        self.chain = chain or (message,)


class VmNotCreated(VmmError):
    """The VMM runs but holds no VM (404 from v53; 500 naming VmNotCreated before)."""


class VmmBusy(VmmError):
    """429: a vCPU removal is still pending in the guest; retry the resize later."""


class MalformedResponse(VmmError):
    """The VMM answered 2xx with a body that is not what the API documents."""


class ResponseTooLarge(MalformedResponse):
    """The answer is over the client's body limit: refused before it is buffered."""
