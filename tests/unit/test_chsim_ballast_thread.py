"""The simulator answers its API at once while the ballast catches up (issue 16).

Cloud Hypervisor answers ``vm.resize`` before the guest has used the memory it was given;
the simulator touched all of it inside the request, so on the real node a 4Gi -> 8Gi grow
was answered after the daemon's call deadline. Here the ballast is held back on purpose:
the API must answer regardless, and the ballast reach the guest's size once let go."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from core.constants import GiB, MiB
from sim.cloudhypervisor import Knobs, VmmModel
from testbed.chsim.ballast import Ballast
from testbed.chsim.server import ChSimServer

BOOT = 256 * MiB


class HeldBallast(Ballast):
    """Counts bytes instead of holding them, and grows only once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def resize(self, size: int) -> None:
        if size > self.size and not self.release.wait(timeout=20):
            return
        self.size = size


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ChSimServer, HeldBallast]]:
    ballast = HeldBallast()
    model = VmmModel(Knobs(), pid=1, file_exists=lambda _path: True)
    server = ChSimServer(str(tmp_path / "ch.sock"), model, ballast=ballast)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server, ballast
    finally:
        ballast.release.set()
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_vm_resize_is_answered_while_the_ballast_is_still_growing(
    served: tuple[ChSimServer, HeldBallast],
) -> None:
    server, ballast = served
    config = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
        "memory": {"size": BOOT, "hotplug_size": 2 * GiB, "hotplug_method": "VirtioMem"},
        "payload": {"kernel": "/vmlinux"},
    }
    with CloudHypervisorClient(server.socket_path, timeout=5.0) as client:
        assert client._call("PUT", "vm.create", config).status_code == 204
        assert client._call("PUT", "vm.boot").status_code == 204
        resized = client._call("PUT", "vm.resize", {"desired_ram": BOOT + GiB})
        assert resized.status_code == 204
        assert ballast.size == 0  # held back: nothing touched yet, and the API answered
        ballast.release.set()
        guest = client._call("GET", "sim.guest").json()
    assert guest["memory_held"] == BOOT + GiB
    for _ in range(200):
        if ballast.size == BOOT + GiB:
            break
        threading.Event().wait(0.05)
    assert ballast.size == BOOT + GiB
