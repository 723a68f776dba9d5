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


def _client_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA (PEM file) and a client certificate + key it signed (clientAuth)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apiserver-client-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "client-ca.crt", directory / "client.crt", directory / "client.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_with_a_client_ca_only_the_api_server_is_answered(certs, client_context, tmp_path):
    directory, _ = certs
    client_ca, client_crt, client_key = _client_cert(tmp_path)
    with start_server(directory / "tls.crt", directory / "tls.key", client_ca=client_ca) as srv:
        anonymous_refused = False
        try:
            status = _review_answered(srv.port, client_context)
        except (ssl.SSLError, OSError):
            anonymous_refused = True
        else:
            anonymous_refused = status != 200
        assert anonymous_refused, "a client without a certificate got a review answered"
        client_context.load_cert_chain(client_crt, client_key)
        assert _review_answered(srv.port, client_context) == 200
