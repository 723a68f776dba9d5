"""The webhook server against hostile input, over real TLS on 127.0.0.1.

Invariant: whatever arrives, every answer is either a well-formed AdmissionReview v1
response for the request's uid (HTTP 200) or a 400 with a message; never a 500, never a
hang, and the server keeps serving afterwards. 10,000 generated bodies (seeded, so a
failure replays) go over a few keep-alive connections: valid reviews, truncated ones,
values of the wrong type, huge numbers, odd unicode, deep nesting and plain garbage.

The other tests here check the transport limits one by one: the 1 MiB body bound (413),
a client that trickles its request (slowloris), a silent TLS client, plaintext, and a
certificate replaced on disk while serving.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.webhook.certs import CertificateAuthority, write_serving_cert
from adapters.webhook.server import Limits, WebhookServer, start_server
from core.constants import API_GROUP, API_VERSION, KIND, VM_CONTAINER, VM_NAME_LABEL

SEED = 20261128
BODIES = 10_000
CONNECTIONS = 4
ROUTES = ("/mutate-vm", "/validate-vm", "/mutate-pod")
CLIENT_TIMEOUT_S = 15.0
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    directory = tmp_path_factory.mktemp("webhook-certs")
    bundle = write_serving_cert(directory, dns_names=["localhost"], ips=["127.0.0.1"])
    return directory, bundle


def _lookup(namespace: str, name: str) -> dict[str, Any] | None:
    # Deterministic and sometimes failing, like an API server would be.
    if name.endswith("gone"):
        return None
    if name.endswith("boom"):
        raise OSError("connection refused")
    return _vm(2, 4, "4Gi", name=name)


@pytest.fixture(scope="module")
def server(certs: tuple[Path, bytes]) -> Iterator[WebhookServer]:
    directory, _ = certs
    srv = WebhookServer(directory / "tls.crt", directory / "tls.key", vm_lookup=_lookup)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client_context(certs: tuple[Path, bytes]) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=certs[1].decode())


# --- the generator --------------------------------------------------------------------


def _vm(sockets: Any, cores: Any, memory: Any, name: str = "vm") -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": "fuzz", "uid": "u-" + name},
        "spec": {
            "instance": {
                "cpu": {"sockets": sockets, "coresPerSocket": cores},
                "memory": {"size": memory},
            }
        },
    }


def _pod(vm_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": vm_name + "-pod",
            "namespace": "fuzz",
            "labels": {VM_NAME_LABEL: vm_name},
        },
        "spec": {"containers": [{"name": VM_CONTAINER, "image": "vmm"}]},
    }


ODD_STRINGS = [
    "",
    "\u0000",
    "\ud800",  # a lone surrogate (valid JSON escape, invalid UTF-16)
    "\u202e4Gi",  # right-to-left override
    "\uff14Gi",  # fullwidth digit four
    "🙂" * 50,
    "Gi" * 5000,
    "1e999999999",
    "0x10",
    "NaN",
    "-0",
    "9" * 5000,
    "1Ki" + "\t" * 10,
    "a/b~c",
]
ODD_NUMBERS: list[Any] = [
    0,
    -1,
    2**63,
    -(2**63) - 1,
    10**300,
    1e308,
    -1e308,
    0.5,
    True,
    None,
]


def _valid(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    route = rng.choice(ROUTES)
    name = rng.choice(["vm", "vm-gone", "vm-boom", "a" * 253])
    if route == "/mutate-pod":
        obj, operation, old = _pod(name), "CREATE", None
    else:
        obj = _vm(
            rng.randint(-1, 8),
            rng.randint(0, 8),
            rng.choice(["4Gi", "1001Mi", "0", "2Mi", "16Gi", 4 << 30]),
            name,
        )
        operation = rng.choice(["CREATE", "UPDATE", "DELETE", "CONNECT"])
        old = None
        if operation == "UPDATE":
            old = _vm(2, 4, "4Gi", name)
            old["status"] = {
                "phase": rng.choice(["Running", "Paused", "Pending", "Bogus"]),
                "capacity": {"maxVcpus": 16, "maxMemory": "20Gi", "bootMemory": "4Gi"},
            }
    request: dict[str, Any] = {
        "uid": f"uid-{i}",
        "kind": {"group": "", "version": "v1", "kind": obj["kind"]},
        "operation": operation,
        "namespace": "fuzz",
        "name": name,
        "object": obj,
    }
    if old is not None:
        request["oldObject"] = old
    return route, {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": request,
    }


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for k, v in enumerate(value):
            found += _paths(v, (*prefix, k))
    return found


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _deep(rng: random.Random) -> Any:
    depth = rng.choice([50, 500, 5000, 200_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return json.loads(opener * 50 + "1" + closer * 50) if depth == 50 else (opener, closer, depth)


def _junk(rng: random.Random) -> Any:
    choice = rng.randrange(6)
    if choice == 0:
        return rng.choice(ODD_STRINGS)
    if choice == 1:
        return rng.choice(ODD_NUMBERS)
    if choice == 2:
        return [rng.choice(ODD_NUMBERS), rng.choice(ODD_STRINGS)]
    if choice == 3:
        return {rng.choice(ODD_STRINGS): rng.choice(ODD_NUMBERS)}
    if choice == 4:
        return _deep(rng) if rng.random() < 0.5 else {}
    return rng.choice([[], {}, "", None])


def _generate(rng: random.Random, i: int) -> tuple[str, bytes, str | None]:
    """(route, body, uid when the body still carries a usable one)."""
    route, review = _valid(rng, i)
    uid: str | None = review["request"]["uid"]
    kind = rng.randrange(10)
    if kind <= 2:  # valid
        return route, json.dumps(review).encode(), uid
    if kind == 3:  # truncated
        data = json.dumps(review).encode()
        return route, data[: rng.randrange(len(data))], None
    if kind in (4, 5, 6):  # one value replaced by something odd
        mutated = copy.deepcopy(review)
        path = rng.choice(_paths(mutated))
        junk = _junk(rng)
        if isinstance(junk, tuple):  # a deep nesting, spliced in as text
            opener, closer, depth = junk
            marker = "__DEEP__"
            text = json.dumps(_set(mutated, path, marker)).replace(
                json.dumps(marker), opener * depth + "1" + closer * depth
            )
            data = text.encode()
            return route, data[:MAX_BODY], None
        mutated = _set(mutated, path, junk)
        request = mutated.get("request") if isinstance(mutated, dict) else None
        ok_uid = isinstance(request, dict) and request.get("uid") == uid
        return route, json.dumps(mutated).encode(), uid if ok_uid else None
    if kind == 7:  # huge numbers written as text
        digits = rng.choice([400, 4300, 5000, 100_000])
        spot = rng.choice(['"sockets": ', '"uid": ', '"request": '])
        text = json.dumps(review).replace(spot, spot + "9" * digits + ', "x": ', 1)
        return route, text.encode()[:MAX_BODY], None
    if kind == 8:  # odd bytes
        junk_bytes = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        return route, rng.choice([junk_bytes, b"\xef\xbb\xbf" + json.dumps(review).encode()]), None
    # odd unicode in names and quantities, as raw (not escaped) UTF-8
    mutated = copy.deepcopy(review)
    mutated["request"]["name"] = rng.choice(ODD_STRINGS)
    obj = mutated["request"]["object"]
    if "spec" in obj and "instance" in obj["spec"]:
        obj["spec"]["instance"]["memory"]["size"] = rng.choice(ODD_STRINGS)
    data = json.dumps(mutated, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return route, data, uid


def _check_review(data: bytes, uid: str | None) -> None:
    review = json.loads(data)
    assert review["apiVersion"] == "admission.k8s.io/v1"
    assert review["kind"] == "AdmissionReview"
    response = review["response"]
    assert isinstance(response["uid"], str) and response["uid"]
    if uid is not None:
        assert response["uid"] == uid
    assert isinstance(response["allowed"], bool)
    if "patch" in response:
        assert response["allowed"] is True
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"], validate=True))
        assert isinstance(ops, list) and ops
        for op in ops:
            assert op["op"] in ("add", "replace", "remove")
            assert op["path"].startswith("/")
    if not response["allowed"]:
        status = response["status"]
        assert isinstance(status["message"], str) and status["message"]
        assert isinstance(status["code"], int)
        # A rule's own failure may be a denial, but never something the API server would
        # show the user as a webhook crash.
        assert status["code"] < 500 or status["code"] == 503, status


class _Client:
    """Keep-alive HTTPS client that reconnects when the server closed the connection."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port, self.context = port, context
        self.connection: http.client.HTTPSConnection | None = None
        self.connects = 0

    def post(self, route: str, body: bytes) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.context, timeout=CLIENT_TIMEOUT_S
                )
                self.connects += 1
            try:
                self.connection.request(
                    "POST", route, body=body, headers={"Content-Type": "application/json"}
                )
                response = self.connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                # A keep-alive connection the server closed after its previous answer.
                self.close()
                if attempt:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close" or response.will_close:
                self.close()
            return response.status, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def test_ten_thousand_generated_reviews(server: WebhookServer, client_context: ssl.SSLContext):
    rng = random.Random(SEED)
    clients = [_Client(server.port, client_context) for _ in range(CONNECTIONS)]
    statuses: dict[int, int] = {}
    started = time.monotonic()
    try:
        for i in range(BODIES):
            route, body, uid = _generate(rng, i)
            status, data = rng.choice(clients).post(route, body)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                try:
                    _check_review(data, uid)
                except (AssertionError, KeyError, ValueError) as exc:
                    raise AssertionError(
                        f"body #{i} on {route}: bad review {data[:300]!r}"
                    ) from exc
            else:
                assert status == 400, f"body #{i} on {route}: HTTP {status} {data[:300]!r}"
                assert data.strip(), f"body #{i}: a 400 without a message"
    finally:
        for c in clients:
            c.close()
    elapsed = time.monotonic() - started
    # Both kinds of answer occur, so the generator really produces both kinds of body.
    assert statuses.get(200, 0) > BODIES // 4 and statuses.get(400, 0) > BODIES // 10, statuses
    assert _healthy(server, client_context)
    # A rule that raised was answered as a denial; the fuzz must not have found one.
    assert server.counts["rule_errors"] == 0, "an admission rule raised: see the log"
    print(f"fuzz_bodies={BODIES} fuzz_seconds={elapsed:.1f} statuses={statuses}")


# --- transport limits ------------------------------------------------------------------


def _healthy(server: WebhookServer, context: ssl.SSLContext) -> bool:
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=5)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    finally:
        connection.close()


def _review_body(uid: str = "uid-x") -> bytes:
    return json.dumps(_valid(random.Random(1), 0)[1] | {"request": {"uid": uid}}).encode()


def test_a_body_over_one_mebibyte_is_413_and_the_server_survives(server, client_context):
    connection = http.client.HTTPSConnection(
        "127.0.0.1", server.port, context=client_context, timeout=10
    )
    try:
        # Announced, not sent: the server must answer from the header alone.
        connection.putrequest("POST", "/validate-vm")
        connection.putheader("Content-Length", str(MAX_BODY + 1))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert response.read().strip()
    finally:
        connection.close()
    assert _healthy(server, client_context)


def test_a_body_of_exactly_one_mebibyte_is_read(server, client_context):
    body = _review_body()
    body = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"
    assert len(body) == MAX_BODY
    status, data = _Client(server.port, client_context).post("/validate-vm", body)
    assert status == 200
    _check_review(data, "uid-x")


def test_unknown_routes_and_methods_are_not_500(server, client_context):
    client = _Client(server.port, client_context)
    status, _ = client.post("/nowhere", _review_body())
    assert status == 404
    connection = http.client.HTTPSConnection(
        "127.0.0.1", server.port, context=client_context, timeout=5
    )
    try:
        connection.request("PUT", "/validate-vm", body=b"{}")
        assert connection.getresponse().status in (400, 404, 405, 501)
    finally:
        connection.close()


def _tls_socket(server: WebhookServer, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_trickling_client_is_cut_off_and_others_are_served(server, client_context):
    sock = _tls_socket(server, client_context)
    try:
        sock.sendall(b"POST /validate-vm HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        # One byte every half second never hits a per-recv timeout; only a deadline on the
        # whole request ends it.
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 40:
            try:
                sock.sendall(b"x")
            except OSError:
                closed = True
                break
            assert _healthy(server, client_context)  # meanwhile others are served
            sock.settimeout(0.5)
            try:
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
        assert closed, "a request trickling in for 40 s was never cut off"
    finally:
        sock.close()


def test_a_silent_tls_client_does_not_stall_the_server(server, client_context):
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(8)]
    try:
        assert _healthy(server, client_context)
        status, data = _Client(server.port, client_context).post("/validate-vm", _review_body())
        assert status == 200
        _check_review(data, "uid-x")
    finally:
        for s in silent:
            s.close()


def test_plaintext_http_is_refused_without_harm(server, client_context):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /validate-vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        sock.settimeout(5)
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        assert b"AdmissionReview" not in data
    assert _healthy(server, client_context)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_below_1_2_is_refused(server, client_context):
    with _tls_socket(server, client_context) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cadata=client_context.get_ca_certs(binary_form=True)[0])
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        pytest.raises((ssl.SSLError, OSError)),
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        old.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        tls.recv(10)
    assert _healthy(server, client_context)


def test_a_replaced_certificate_is_served_to_new_connections(tmp_path: Path):
    first = write_serving_cert(tmp_path / "a", dns_names=["localhost"], ips=["127.0.0.1"])
    live = tmp_path / "live"
    live.mkdir()
    for name in ("tls.crt", "tls.key"):
        (live / name).write_bytes((tmp_path / "a" / name).read_bytes())
    srv = WebhookServer(live / "tls.crt", live / "tls.key")
    srv.start()
    try:
        assert _healthy(srv, ssl.create_default_context(cadata=first.decode()))
        second = write_serving_cert(tmp_path / "b", dns_names=["localhost"], ips=["127.0.0.1"])
        time.sleep(0.01)  # a distinct mtime even on coarse file systems
        for name in ("tls.key", "tls.crt"):
            tmp = live / (name + ".new")
            tmp.write_bytes((tmp_path / "b" / name).read_bytes())
            tmp.replace(live / name)
        new_context = ssl.create_default_context(cadata=second.decode())
        deadline = time.monotonic() + 5
        while True:
            try:
                assert _healthy(srv, new_context)
                break
            except ssl.SSLError:
                assert time.monotonic() < deadline, "the new certificate was never served"
                time.sleep(0.05)
        with pytest.raises(ssl.SSLError):
            _healthy(srv, ssl.create_default_context(cadata=first.decode()))
    finally:
        srv.stop()


def test_stop_releases_the_port(certs):
    directory, _ = certs
    srv = WebhookServer(directory / "tls.crt", directory / "tls.key")
    srv.start()
    port = srv.port
    assert srv.url == f"https://127.0.0.1:{port}"
    srv.stop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


# --- connection limits, with short timeouts ---------------------------------------------

QUICK = Limits(handshake_s=0.5, request_s=0.5, idle_s=1.0, max_connections=4)


@pytest.fixture
def quick_server(certs: tuple[Path, bytes]) -> Iterator[WebhookServer]:
    directory, _ = certs
    with start_server(directory / "tls.crt", directory / "tls.key", limits=QUICK) as srv:
        yield srv


def test_reviews_share_one_keepalive_connection_and_are_logged(
    quick_server, client_context, caplog
):
    # Regression: the review log line used the key "name", which LogRecord owns, so at
    # INFO level every review raised after its answer was buffered and the connection
    # was dropped: kube-apiserver, reusing it, saw EOF on ~40% of its webhook calls.
    caplog.set_level(logging.INFO, logger="adapters.webhook.server")
    client = _Client(quick_server.port, client_context)
    try:
        for _ in range(5):
            status, _ = client.post("/validate-vm", _review_body())
            assert status == 200 and client.connection is not None
        assert client.connects == 1
    finally:
        client.close()
    reviewed = [r for r in caplog.records if r.getMessage() == "admission reviewed"]
    assert len(reviewed) == 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_connections_beyond_the_limit_are_closed_not_queued(certs, client_context):
    # Every slot busy reading a request (idle ones would make way: ADR 0011).
    limits = Limits(handshake_s=0.5, request_s=5.0, idle_s=1.0, max_connections=4)
    directory, _ = certs
    with start_server(directory / "tls.crt", directory / "tls.key", limits=limits) as srv:
        held = [_tls_socket(srv, client_context) for _ in range(limits.max_connections)]
        try:
            for sock in held:
                sock.sendall(b"POST /validate-vm HTTP/1.1\r\n")  # and no more, for now
            deadline = time.monotonic() + 10
            while not all(not c.idle for c in list(srv._server.connections.values())) or len(
                srv._server.connections
            ) < len(held):
                assert time.monotonic() < deadline, "the held connections never became busy"
                time.sleep(0.02)
            extra = socket.create_connection(("127.0.0.1", srv.port), timeout=0.2)
            with extra:
                assert _closed_by_server(extra, time.monotonic() + 2)
            assert srv.counts["refused_connections"] >= 1
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while True:  # the held connections' threads end, and the server serves again
            try:
                if _healthy(srv, client_context):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server never recovered its connections"
            time.sleep(0.1)


def test_stop_does_not_wait_for_idle_keepalive_connections(certs, client_context):
    directory, _ = certs
    srv = start_server(directory / "tls.crt", directory / "tls.key")
    client = _Client(srv.port, client_context)
    try:
        assert client.post("/validate-vm", _review_body())[0] == 200  # stays open, idle
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 2
    finally:
        client.close()


def _served_by(port: int, ca: CertificateAuthority) -> bool:
    context = ssl.create_default_context(cadata=ca.bundle.decode())
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
    except ssl.SSLCertVerificationError:
        return False


def test_a_half_written_pair_keeps_the_previous_certificate(tmp_path: Path):
    ca = CertificateAuthority.create("first")
    write_serving_cert(tmp_path, ca=ca)
    with start_server(tmp_path / "tls.crt", tmp_path / "tls.key") as srv:
        other = CertificateAuthority.create("second").issue(["localhost"], ["127.0.0.1"])
        (tmp_path / "tls.key").write_bytes(other.key_pem)  # the certificate is still old
        assert _served_by(srv.port, ca), "a mismatched pair must not break the server"
        (tmp_path / "tls.crt").write_bytes(other.cert_pem)
        assert not _served_by(srv.port, ca)  # the new pair, once consistent
