"""A real Kubernetes control plane (etcd + kube-apiserver) on loopback, for tests, the
local stack and benchmarks.

``ControlPlane`` starts etcd and kube-apiserver as child processes, each in its own
process group with ``PR_SET_PDEATHSIG`` set, so they die with the Python process that
started them even when it is killed outright; an atexit hook and ``stop()`` (SIGTERM,
then SIGKILL after a grace period) cover orderly exits. Everything listens on 127.0.0.1.

The API server runs the way a cluster's does: TLS with a private CA, client-certificate
authentication, ``Node,RBAC`` authorization, the default admission chain plus
``NodeRestriction`` (so MutatingAdmissionWebhook and ValidatingAdmissionWebhook are on),
service-account tokens signed with a generated key. What a cluster has beyond the API
server is absent: no scheduler, no kubelet, no kube-controller-manager. Two duties of
the latter that every pod create depends on are done here instead:

- each namespace gets its ``default`` ServiceAccount (the ServiceAccount admission
  plugin refuses pods without one); a thread watches namespaces for that;
- ``add_node`` writes a Node with capacity, allocatable and a Ready condition, and
  removes the ``not-ready`` taint the TaintNodesByCondition plugin puts on new nodes.

Deleting a namespace leaves it ``Terminating`` (no namespace controller empties it);
the NamespaceLifecycle plugin then refuses new objects in it.

``start_scheduler`` and ``start_controller_manager`` add the real kube-scheduler and
kube-controller-manager (same Kubernetes version) on demand; the local stack starts
them (ADR 0014), the bare session control plane of the tests does not.

State (certificates, etcd data, logs, the admin kubeconfig) lives in ``state_dir``;
with a directory given, a restart reuses the certificates, ports if free, and data.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import yaml  # type: ignore[import-untyped]  # PyYAML, a dependency of the kubernetes client
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from kubernetes import client as k8s

from adapters import pki as pki_
from testbed.controlplane.build import ControlPlaneBinaries, ensure_binaries
from testbed.procs import STOP_GRACE_S, Child, tail

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CRD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "crd" / "virtualmachines.yaml"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# The default admission chain is on without being named; these are named because the
# product depends on them, and NodeRestriction is what real clusters add.
ADMISSION_PLUGINS = ("NodeRestriction", "MutatingAdmissionWebhook", "ValidatingAdmissionWebhook")
ADMIN_USER = "chscale-admin"
ADMIN_GROUP = "system:masters"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
DEFAULT_SERVICE_ACCOUNT = "default"
# What ``add_node`` registers unless told otherwise (the kubelet's default pod limit).
DEFAULT_NODE_CPU = "16"
DEFAULT_NODE_MEMORY = "32Gi"
DEFAULT_NODE_PODS = 110
READY_TIMEOUT_S = 60.0
CRD_TIMEOUT_S = 30.0
POLL_S = 0.05
PORT_ATTEMPTS = 3


class ControlPlaneError(RuntimeError):
    """The control plane did not start, or an API call it makes failed."""


class ApiCallError(ControlPlaneError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


@attrs.frozen(slots=True)
class Pki:
    """File paths of the generated certificates and keys."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def under(cls, directory: Path) -> Pki:
        return cls(
            *(
                directory / name
                for name in (
                    "ca.crt",
                    "ca.key",
                    "apiserver.crt",
                    "apiserver.key",
                    "admin.crt",
                    "admin.key",
                    "sa.key",
                    "sa.pub",
                )
            )
        )

    def files(self) -> tuple[Path, ...]:
        return attrs.astuple(self, recurse=False)


@attrs.frozen(slots=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int


# --- certificates ---------------------------------------------------------------------


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = pki_.key_pem(key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def generate_pki(directory: Path) -> Pki:
    """A CA, the API server's serving certificate, an admin client certificate
    (O=system:masters) and a service-account key pair; kept if already there."""
    pki = Pki.under(directory)
    if all(path.is_file() for path in pki.files()):
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_name = pki_.new_key(), pki_.name("chscale-local-ca")
    _write_key(pki.ca_key, ca_key)
    _write_cert(pki.ca_cert, pki_.issue(ca_name, ca_key, ca_name, ca_key, ca=True))

    serving_key = pki_.new_key()
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
    ]
    serving = pki_.issue(
        pki_.name("kube-apiserver"),
        serving_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    )
    _write_key(pki.serving_key, serving_key)
    _write_cert(pki.serving_cert, serving)

    admin_key = pki_.new_key()
    admin = pki_.issue(
        pki_.name(ADMIN_USER, ADMIN_GROUP),
        admin_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    _write_key(pki.admin_key, admin_key)
    _write_cert(pki.admin_cert, admin)

    sa_key = pki_.new_key()
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def kubeconfig_text(server_url: str, pki: Pki) -> str:
    """An admin kubeconfig with the certificates embedded (so it can be copied anywhere)."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "chscale",
                "cluster": {
                    "server": server_url,
                    "certificate-authority-data": b64(pki.ca_cert),
                },
            }
        ],
        "users": [
            {
                "name": ADMIN_USER,
                "user": {
                    "client-certificate-data": b64(pki.admin_cert),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [{"name": "chscale", "context": {"cluster": "chscale", "user": ADMIN_USER}}],
        "current-context": "chscale",
        "preferences": {},
    }
    return yaml.safe_dump(config, sort_keys=False)


# --- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


# --- a minimal HTTPS client (the launcher's own calls, and readiness probes) ----------


class _Http:
    """JSON over HTTPS with the admin certificate; no retries (callers poll)."""

    def __init__(self, port: int, pki: Pki, timeout: float = 10.0) -> None:
        self.port, self.timeout = port, timeout
        self.context = ssl.create_default_context(cafile=str(pki.ca_cert))
        self.context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))

    def connect(self, timeout: float | None = None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            LOOPBACK, self.port, context=self.context, timeout=timeout or self.timeout
        )

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        conn = self.connect()
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (),
    ) -> dict[str, Any]:
        """The decoded answer; raises ApiCallError unless 2xx or in ``ok``."""
        status, data = self.raw(method, path, body, content_type)
        if not (200 <= status < 300 or status in ok):
            raise ApiCallError(method, path, status, data.decode(errors="replace"))
        try:
            decoded = json.loads(data) if data else {}
        except ValueError:
            decoded = {}
        return decoded if isinstance(decoded, dict) else {}


def _condition_true(obj: dict[str, Any], type_: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the control plane ----------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver on loopback, the VirtualMachine CRD installed.

    Use as a context manager, or call ``start()`` and ``stop()``. ``state_dir=None``
    uses a temporary directory removed by ``stop()``. ``timings`` holds the seconds each
    startup step took (``certificates``, ``apiserver_ready``, ``crd_established``,
    ``total``).
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        binaries: ControlPlaneBinaries | None = None,
        crd_path: Path | None = CRD_PATH,
        ready_timeout: float = READY_TIMEOUT_S,
        build_output: IO[str] | None = None,
    ) -> None:
        self._temporary = state_dir is None
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.binaries = binaries
        self.crd_path = crd_path
        self.ready_timeout = ready_timeout
        self.build_output = build_output
        self.timings: dict[str, float] = {}
        self._pki: Pki | None = None
        self._ports: Ports | None = None
        self._http: _Http | None = None
        self._etcd: Child | None = None
        self._apiserver: Child | None = None
        self._accounts: _ServiceAccounts | None = None
        self._atexit_registered = False

    # --- what callers use --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._apiserver is not None and self._apiserver.alive()

    @property
    def processes(self) -> dict[str, Child]:
        """The processes this control plane started (for benchmarks that read their CPU)."""
        named = {"etcd": self._etcd, "kube-apiserver": self._apiserver}
        return {name: child for name, child in named.items() if child is not None}

    @property
    def server_url(self) -> str:
        return f"https://{LOOPBACK}:{self._need_ports().apiserver}"

    @property
    def etcd_url(self) -> str:
        return f"http://{LOOPBACK}:{self._need_ports().etcd_client}"

    @property
    def kubeconfig_path(self) -> Path:
        return self._need_dir() / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self._need_dir() / "logs"

    @property
    def pki(self) -> Pki:
        if self._pki is None:
            raise ControlPlaneError("the control plane has not been started")
        return self._pki

    @property
    def ca_cert_path(self) -> Path:
        return self.pki.ca_cert

    @property
    def admin_cert_path(self) -> Path:
        return self.pki.admin_cert

    @property
    def admin_key_path(self) -> Path:
        return self.pki.admin_key

    def api_client(self) -> k8s.ApiClient:
        """A new official-client ApiClient authenticated as the admin (system:masters).
        The caller closes it (``with cp.api_client() as c:`` or ``c.close()``)."""
        pki = self.pki
        configuration = k8s.Configuration(
            host=self.server_url,
            ssl_ca_cert=str(pki.ca_cert),
            cert_file=str(pki.admin_cert),
            key_file=str(pki.admin_key),
        )
        # Controllers share one client among many workers and watches.
        configuration.connection_pool_maxsize = 32
        return k8s.ApiClient(configuration)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One JSON call as the admin; raises ApiCallError on a non-2xx answer."""
        return self._need_http().call(method, path, body, content_type)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        """Create ``name`` (if absent) with its ``default`` ServiceAccount, so pods can be
        created in it at once."""
        meta: dict[str, Any] = {"name": name}
        if labels:
            meta["labels"] = labels
        self._need_http().call(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": meta},
            ok=(409,),
        )
        _ensure_service_account(self._need_http(), name)
        return name

    def delete_namespace(self, name: str) -> None:
        """Delete ``name``; it stays Terminating (there is no namespace controller)."""
        self._need_http().call("DELETE", f"/api/v1/namespaces/{name}", ok=(404, 409))

    def add_node(
        self,
        name: str,
        cpu: int | str = DEFAULT_NODE_CPU,
        memory: str = DEFAULT_NODE_MEMORY,
        pods: int = DEFAULT_NODE_PODS,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A Ready Node with ``cpu``/``memory``/``pods`` as capacity and allocatable, as a
        kubelet would register it (there is none). Returns the Node object."""
        http_ = self._need_http()
        all_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(labels or {}),
        }
        http_.call(
            "POST",
            "/api/v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}},
            ok=(409,),
        )
        resources = {"cpu": str(cpu), "memory": str(memory), "pods": str(pods)}
        now = _now()
        status = {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": LOOPBACK},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "registered by chscale's control-plane launcher",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {"operatingSystem": "linux", "architecture": "amd64"},
        }
        http_.call(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            {"status": status},
            "application/strategic-merge-patch+json",
        )
        # The node lifecycle controller would lift this taint once the node is Ready.
        node = http_.call("GET", f"/api/v1/nodes/{name}")
        taints = (node.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != NOT_READY_TAINT]
        if kept != taints:
            node = http_.call(
                "PATCH",
                f"/api/v1/nodes/{name}",
                {
                    "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                    "spec": {"taints": kept or None},
                },
                "application/merge-patch+json",
            )
        log.info(
            "controlplane.node_added node=%s cpu=%s memory=%s pods=%s", name, cpu, memory, pods
        )
        return node

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._apiserver is not None:
            raise ControlPlaneError("the control plane is already running")
        started = time.monotonic()
        if self.binaries is None:
            self.binaries = ensure_binaries(out=self.build_output)
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="chscale-cp-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._register_atexit()
        try:
            self._start(started)
        except BaseException:
            self.stop()
            raise

    def _start(self, started: float) -> None:
        state = self._need_dir()
        mark = time.monotonic()
        self._pki = generate_pki(state / "pki")
        self.timings["certificates"] = time.monotonic() - mark
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._ports = self._choose_ports(fresh=attempt > 1)
            self._http = _Http(self._ports.apiserver, self._pki)
            self._launch()
            try:
                self._wait_ready(started)
                break
            except ControlPlaneError as exc:
                # Another process can take a port between our probe and the bind.
                if attempt == PORT_ATTEMPTS or "address already in use" not in str(exc):
                    raise
                log.warning("controlplane.port_taken attempt=%d retry=true", attempt)
                self._stop_processes()
        self.kubeconfig_path.write_text(kubeconfig_text(self.server_url, self._pki))
        self._accounts = _ServiceAccounts(self._need_http())
        self._accounts.start()
        _ensure_service_account(self._need_http(), "default")
        if self.crd_path is not None:
            mark = time.monotonic()
            self._install_crd(self.crd_path)
            self.timings["crd_established"] = time.monotonic() - mark
        self.timings["total"] = time.monotonic() - started
        log.info(
            "controlplane.ready server=%s state_dir=%s total_s=%.2f",
            self.server_url,
            state,
            self.timings["total"],
        )

    def stop(self) -> None:
        """Stop everything this object started; safe to call twice, and on failure."""
        if self._accounts is not None:
            self._accounts.stop()
        self._stop_processes()
        if self._accounts is not None:
            self._accounts.join(timeout=STOP_GRACE_S)
            self._accounts = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        if self._temporary and self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None

    # --- internals ---------------------------------------------------------------------

    def _need_dir(self) -> Path:
        if self.state_dir is None:
            raise ControlPlaneError("the control plane has not been started")
        return self.state_dir

    def _need_ports(self) -> Ports:
        if self._ports is None:
            raise ControlPlaneError("the control plane has not been started")
        return self._ports

    def _need_http(self) -> _Http:
        if self._http is None or not self.running:
            raise ControlPlaneError("the control plane is not running")
        return self._http

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

    def _choose_ports(self, *, fresh: bool) -> Ports:
        # Reusing the last ports keeps an exported kubeconfig valid across restarts and
        # etcd's recorded peer URL in step with its data.
        record = self._need_dir() / "ports.json"
        if not fresh:
            with contextlib.suppress(OSError, ValueError, TypeError):
                ports = Ports(**json.loads(record.read_text()))
                if all(_port_free(p) for p in attrs.astuple(ports)):
                    return ports
        chosen: set[int] = set()
        while len(chosen) < 3:
            chosen.add(free_port())
        ports = Ports(*sorted(chosen))
        record.write_text(json.dumps(attrs.asdict(ports)))
        return ports

    def _launch(self) -> None:
        assert self.binaries is not None and self._pki is not None and self._ports is not None
        state, pki, ports = self._need_dir(), self._pki, self._ports
        peer = f"http://{LOOPBACK}:{ports.etcd_peer}"
        client = f"http://{LOOPBACK}:{ports.etcd_client}"
        etcd_argv = [
            str(self.binaries.etcd),
            "--name=chscale",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=chscale={peer}",
            # A throwaway single-member store: fsync buys durability across power loss,
            # which a test or local stack does not need, at a large cost in latency.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
        apiserver_argv = [
            str(self.binaries.apiserver),
            f"--etcd-servers={client}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            f"--secure-port={ports.apiserver}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--allow-privileged=true",
            # The `kubernetes` Service's endpoints would be 127.0.0.1, which Endpoints
            # validation forbids; the reconciler would log an error every 10 s.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={state / 'pki' / 'generated'}",
            "--v=1",
        ]
        logs = state / "logs"
        self._etcd = Child("etcd", etcd_argv, logs / "etcd.log")
        # Started together: the API server retries etcd while it builds its own state.
        self._apiserver = Child("kube-apiserver", apiserver_argv, logs / "kube-apiserver.log")

    def _wait_ready(self, started: float) -> None:
        assert self._http is not None
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            for process in (self._etcd, self._apiserver):
                if process is not None and not process.alive():
                    raise ControlPlaneError(process.failure())
            try:
                status, body = self._http.raw("GET", "/readyz")
                if status == 200:
                    self.timings["apiserver_ready"] = time.monotonic() - started
                    return
                last = f"HTTP {status}: {body.decode(errors='replace')[-300:]}"
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(POLL_S)
        assert self._apiserver is not None
        raise ControlPlaneError(
            f"kube-apiserver not ready within {self.ready_timeout:.0f}s at {self.server_url} "
            f"(last /readyz: {last}); last lines of {self._apiserver.log_path}:\n"
            f"{tail(self._apiserver.log_path)}"
        )

    def _install_crd(self, path: Path) -> None:
        http_ = self._need_http()
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        status, body = http_.raw(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
        )
        if status == 409:
            # A reused state directory: bring the stored definition up to this file.
            current = http_.call("GET", url)
            crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            http_.call("PUT", url, crd)
        elif not 200 <= status < 300:
            raise ApiCallError("POST", "customresourcedefinitions", status, body.decode())
        spec = crd["spec"]
        served = next(v["name"] for v in spec["versions"] if v.get("served"))
        collection = f"/apis/{spec['group']}/{served}/{spec['names']['plural']}"
        deadline = time.monotonic() + CRD_TIMEOUT_S
        established = False
        while time.monotonic() < deadline:
            if not established:
                established = _condition_true(http_.call("GET", url), "Established")
            # Established can precede the moment the new endpoint answers.
            if established and http_.raw("GET", collection + "?limit=1")[0] == 200:
                return
            time.sleep(POLL_S)
        raise ControlPlaneError(
            f"CRD {name} not {'served' if established else 'Established'} "
            f"within {CRD_TIMEOUT_S:.0f}s"
        )

    def _stop_processes(self) -> None:
        # The API server first: stopped after etcd it would spend its grace period
        # failing to reach storage.
        for attr in ("_apiserver", "_etcd"):
            process: Child | None = getattr(self, attr)
            if process is not None:
                process.stop()
                setattr(self, attr, None)


# --- the real kube-scheduler and kube-controller-manager, on demand -----------------

# A stack labels its nodes with this and its scheduler only considers nodes carrying the
# stack's value: on an API server shared by several stacks (the test session's), one
# stack's scheduler must not place pods onto another stack's (or a bare test's) nodes.
STACK_LABEL = "chscale.io/stack"
# Without node heartbeats (the tests' bare Nodes) the node lifecycle controller would
# taint and evict; a control plane shared with such nodes runs without it.
WITHOUT_NODE_LIFECYCLE = ("*", "-nodelifecycle")


def _need_binaries(cp: ControlPlane) -> ControlPlaneBinaries:
    if cp.binaries is None or not cp.running:
        raise ControlPlaneError("the control plane is not running")
    return cp.binaries


def start_scheduler(cp: ControlPlane, directory: Path, *, stack: str | None = None) -> Child:
    """kube-scheduler on ``cp``, as ``default-scheduler``; with ``stack`` it places pods
    only onto nodes labelled ``STACK_LABEL=<stack>`` (its profile's added node affinity).
    It serves nothing (``--secure-port=0``): no port to collide with another run's."""
    binaries = _need_binaries(cp)
    directory.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {"schedulerName": "default-scheduler"}
    if stack is not None:
        term = {"matchExpressions": [{"key": STACK_LABEL, "operator": "In", "values": [stack]}]}
        profile["pluginConfig"] = [
            {
                "name": "NodeAffinity",
                "args": {
                    "addedAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [term]
                        }
                    }
                },
            }
        ]
    config = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(cp.kubeconfig_path)},
        "leaderElection": {"leaderElect": False},
        "profiles": [profile],
    }
    config_path = directory / "kube-scheduler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [
        str(binaries.scheduler),
        f"--config={config_path}",
        "--secure-port=0",
        f"--bind-address={LOOPBACK}",
        "--v=1",
    ]
    return Child("kube-scheduler", argv, directory / "kube-scheduler.log")


def start_controller_manager(
    cp: ControlPlane, directory: Path, *, controllers: tuple[str, ...] = ("*",)
) -> Child:
    """kube-controller-manager on ``cp``: quota usage, garbage collection, namespace
    deletion, service-account tokens, ReplicaSets... as on a real cluster. Serves nothing
    (``--secure-port=0``)."""
    binaries = _need_binaries(cp)
    directory.mkdir(parents=True, exist_ok=True)
    pki = cp.pki
    argv = [
        str(binaries.controller_manager),
        f"--kubeconfig={cp.kubeconfig_path}",
        "--secure-port=0",
        f"--bind-address={LOOPBACK}",
        "--leader-elect=false",
        f"--controllers={','.join(controllers)}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca_cert}",
        f"--cluster-signing-cert-file={pki.ca_cert}",
        f"--cluster-signing-key-file={pki.ca_key}",
        "--use-service-account-credentials=false",
        "--v=1",
    ]
    return Child("kube-controller-manager", argv, directory / "kube-controller-manager.log")


# --- kube-controller-manager's serviceaccounts controller, in miniature --------------


def _ensure_service_account(http_: _Http, namespace: str) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": DEFAULT_SERVICE_ACCOUNT, "namespace": namespace},
    }
    # 403: the namespace is terminating; 404: it is already gone.
    http_.call("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body, ok=(403, 404, 409))


class _ServiceAccounts(threading.Thread):
    """Gives every active namespace its ``default`` ServiceAccount (list, then watch)."""

    WATCH_TIMEOUT_S = 60

    def __init__(self, http_: _Http) -> None:
        super().__init__(name="controlplane-serviceaccounts", daemon=True)
        self.http = http_
        self._stopping = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None

    def stop(self) -> None:
        self._stopping.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._list_and_watch()
            except (OSError, http.client.HTTPException, ControlPlaneError, ValueError) as exc:
                if self._stopping.is_set():
                    return
                log.warning("controlplane.serviceaccounts error=%r retry_in_s=1", exc)
                self._stopping.wait(1.0)

    def _ensure(self, namespace: dict[str, Any]) -> None:
        if (namespace.get("status") or {}).get("phase", "Active") == "Active":
            _ensure_service_account(self.http, namespace["metadata"]["name"])

    def _list_and_watch(self) -> None:
        listing = self.http.call("GET", "/api/v1/namespaces")
        for item in listing.get("items") or []:
            self._ensure(item)
        version = listing["metadata"]["resourceVersion"]
        while not self._stopping.is_set():
            for event in self._watch(version):
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    return  # e.g. 410 Gone: relist
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                if event.get("type") in ("ADDED", "MODIFIED"):
                    self._ensure(obj)

    def _watch(self, version: str) -> Iterator[dict[str, Any]]:
        path = (
            f"/api/v1/namespaces?watch=1&allowWatchBookmarks=true"
            f"&resourceVersion={version}&timeoutSeconds={self.WATCH_TIMEOUT_S}"
        )
        conn = self.http.connect(timeout=self.WATCH_TIMEOUT_S + 10)
        self._conn = conn
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ApiCallError("GET", path, resp.status, resp.read().decode(errors="replace"))
            while not self._stopping.is_set():
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            self._conn = None
            conn.close()
