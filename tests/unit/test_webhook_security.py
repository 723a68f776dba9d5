"""Starving the admission webhook (issue 17, item 4), on loopback.

With ``failurePolicy: Fail`` a webhook that cannot answer blocks every VM and VM-pod write
in the cluster, so idle connections must not be able to take its slots: a first-request
deadline, a per-peer cap, and idle connections making way for new ones.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

import pytest

from adapters.webhook.certs import write_serving_cert
from adapters.webhook.server import Limits, start_server
from tests.unit.test_webhook_fuzz import _Client, _closed_by_server, _review_body, _tls_socket


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    directory = tmp_path_factory.mktemp("webhook-certs")
    return directory, write_serving_cert(directory, dns_names=["localhost"], ips=["127.0.0.1"])


@pytest.fixture
def client_context(certs: tuple[Path, bytes]) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=certs[1].decode())


ATTACKERS = 128


def _review_answered(port: int, context: ssl.SSLContext) -> int:
    client = _Client(port, context)
    try:
        status, _ = client.post("/validate-vm", _review_body())
        return status
    finally:
        client.close()


def _wait_for(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_128_idle_tls_connections_do_not_block_a_review(certs, client_context):
    directory, _ = certs
    with start_server(directory / "tls.crt", directory / "tls.key") as srv:
        held = []
        try:
            for _ in range(ATTACKERS):
                # Handshake done, then idle; the server may close some already: fine.
                with contextlib.suppress(OSError):
                    held.append(_tls_socket(srv, client_context))
            assert _review_answered(srv.port, client_context) == 200
        finally:
            for sock in held:
                sock.close()


def test_silent_tcp_connections_do_not_block_a_review(certs, client_context):
    directory, _ = certs
    with start_server(directory / "tls.crt", directory / "tls.key") as srv:
        held = [
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(ATTACKERS)
        ]
        try:
            assert _review_answered(srv.port, client_context) == 200
        finally:
            for sock in held:
                sock.close()


def test_a_connection_that_never_sends_a_request_is_closed_at_the_first_request_deadline(
    certs, client_context
):
    directory, _ = certs
    limits = Limits(first_request_s=0.5)
    with (
        start_server(directory / "tls.crt", directory / "tls.key", limits=limits) as srv,
        _tls_socket(srv, client_context) as idle,
    ):
        idle.settimeout(0.5)
        # Bounded: far below idle_s (120 s), which applied before the first request.
        assert _closed_by_server(idle, time.monotonic() + 10)


def test_one_peer_holds_at_most_its_share(certs, client_context):
    directory, _ = certs
    limits = Limits(max_per_peer=8, max_connections=64)
    with start_server(directory / "tls.crt", directory / "tls.key", limits=limits) as srv:
        held = [_tls_socket(srv, client_context) for _ in range(20)]
        try:
            _wait_for(
                lambda: len(srv._server.connections) <= limits.max_per_peer,
                "one peer kept more than its share of connections",
            )
            assert srv.counts["evicted_idle"] >= 20 - limits.max_per_peer
            assert _review_answered(srv.port, client_context) == 200
        finally:
            for sock in held:
                sock.close()
