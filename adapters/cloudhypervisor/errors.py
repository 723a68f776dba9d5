"""What can go wrong talking to a Cloud Hypervisor API socket.

The split follows what a caller does next: :class:`VmmUnreachable` (no process behind the
socket, or it does not answer: wait for it or report it), :class:`VmNotCreated` (the VMM
runs but holds no VM: create one), :class:`VmmBusy` (429, a vCPU removal is still pending
in the guest: retry later, it is not a failure), :class:`VmmError` (the VMM refused: its
message says why).
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
