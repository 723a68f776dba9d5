"""The VMM client's limits where an HTTP library would not keep them by itself (ADR 0011):
a head dribbled a byte at a time (a library's timeout is per read), a head too large to
keep, and a request that must never be sent twice (vm.boot and vm.create are not
idempotent). Loopback Unix sockets only; every server loop is bounded."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from adapters.cloudhypervisor.client import MAX_HEADER_BYTES, CloudHypervisorClient
from adapters.cloudhypervisor.errors import VmmUnreachable
from tests.unit.test_vmm_security import serving


def _dribble_head(conn: socket.socket) -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"y" * 250 + b"\r\nContent-Length: 2\r\n\r\n{}"
    for byte in head:  # bounded: one byte each 20 ms, about 5 s in all
        conn.sendall(bytes([byte]))
        time.sleep(0.02)


def test_a_dribbled_head_is_cut_off_at_the_call_deadline(tmp_path: Path) -> None:
    path = str(tmp_path / "ch.sock")
    with serving(path, _dribble_head):
        client = CloudHypervisorClient(path, timeout=0.5)
        with pytest.raises(VmmUnreachable, match=r"within 0\.5s"):
            client.info_raw()


def _long_head(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Pad-%d: " + b"z" * 8000 + b"\r\n"
    for i in range(2 * MAX_HEADER_BYTES // 8000):  # each line and their count are legal
        conn.sendall(line % i)
    conn.sendall(b"Content-Length: 2\r\n\r\n{}")


def test_a_head_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "ch.sock")
    with serving(path, _long_head):
        client = CloudHypervisorClient(path, timeout=5.0)
        with pytest.raises(VmmUnreachable, match="head over"):
            client.info_raw()


def test_a_request_without_an_answer_is_not_sent_again(tmp_path: Path) -> None:
    path = str(tmp_path / "ch.sock")
    connections: list[int] = []
    with serving(path, lambda conn: connections.append(conn.fileno())):
        client = CloudHypervisorClient(path, timeout=5.0)
        with pytest.raises(VmmUnreachable):
            client.boot()  # the server hangs up without answering
    assert len(connections) == 1
