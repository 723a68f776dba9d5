"""chscale-webhook: the admission webhooks (VM defaults and validation, VM pods) over HTTPS.

  chscale-webhook [serve] --cert tls.crt --key tls.key [--port 9443] [--bind 127.0.0.1]
                          [--kubeconfig K] [--pod-memory-overhead 256Mi]
  chscale-webhook certs --dir D [--dns NAME]... [--ip IP]... [--service S --namespace N]
  chscale-webhook register --url https://127.0.0.1:9443 --ca-bundle D/ca.crt [--kubeconfig K]
  chscale-webhook unregister [--kubeconfig K]

``certs`` makes a self-signed CA and a serving certificate; ``register`` points the API
server at a webhook outside the cluster (``clientConfig.url``), for local use. In a
cluster, deploy/webhook/ registers a Service instead.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from attrs import evolve, frozen

from adapters.k8s.client import ApiError, Conflict, Kube, NotFound, load_api_client
from adapters.webhook.admission import LookupFailed, VmLookup
from adapters.webhook.certs import service_dns_names, write_serving_cert
from adapters.webhook.server import MUTATE_POD, MUTATE_VM, VALIDATE_VM, Limits, WebhookServer
from apps.common import logs
from apps.common.runtime import kernel_config, wait_for_signal
from core.constants import API_GROUP, API_VERSION, KIND, PLURAL, VM_NAME_LABEL

log = logging.getLogger("chscale.webhook")

ADMISSION = "/apis/admissionregistration.k8s.io/v1"
MUTATING_PATH = f"{ADMISSION}/mutatingwebhookconfigurations"
VALIDATING_PATH = f"{ADMISSION}/validatingwebhookconfigurations"
DEFAULT_PREFIX = "chscale"
DEFAULT_PORT = 9443
# Well under the API server's 30 s request timeout, so a slow webhook fails one write
# clearly instead of stalling it.
TIMEOUT_SECONDS = 5
VM_DEFAULTS_HOOK = f"vm-defaults.{API_GROUP}"
VM_POD_HOOK = f"vm-pod.{API_GROUP}"
VM_VALIDATION_HOOK = f"vm-validation.{API_GROUP}"
ACTIVE_POLL_S = 0.1


@frozen
class ServiceRef:
    """Where the API server reaches an in-cluster webhook."""

    name: str
    namespace: str
    port: int = 443


def _b64(ca_bundle: bytes | str) -> str:
    data = ca_bundle.encode() if isinstance(ca_bundle, str) else ca_bundle
    return base64.b64encode(data).decode()


def webhook_configurations(
    ca_bundle: bytes | str | None,
    *,
    url_base: str | None = None,
    service: ServiceRef | None = None,
    name_prefix: str = DEFAULT_PREFIX,
    namespace_selector: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The MutatingWebhookConfiguration and the ValidatingWebhookConfiguration, calling
    ``url_base`` (local use) or ``service`` (in a cluster). ``namespace_selector`` limits
    every hook to some namespaces (tests); by default the VM rules apply to every VM."""
    if (url_base is None) == (service is None):
        raise ValueError("give exactly one of url_base and service")

    def client_config(route: str) -> dict[str, Any]:
        config: dict[str, Any]
        if service is not None:
            config = {
                "service": {
                    "name": service.name,
                    "namespace": service.namespace,
                    "path": route,
                    "port": service.port,
                }
            }
        else:
            config = {"url": f"{str(url_base).rstrip('/')}{route}"}
        if ca_bundle is not None:
            config["caBundle"] = _b64(ca_bundle)
        return config

    def hook(name: str, route: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "clientConfig": client_config(route),
            "rules": rules,
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": TIMEOUT_SECONDS,
            "admissionReviewVersions": ["v1"],
        }
        if namespace_selector is not None:
            body["namespaceSelector"] = namespace_selector
        return body

    # The main resource only: status writes (the controller's and the daemon's) never
    # wait for, or fail with, the webhook.
    vm_rules = [
        {
            "apiGroups": [API_GROUP],
            "apiVersions": [API_VERSION],
            "operations": ["CREATE", "UPDATE"],
            "resources": [PLURAL],
            "scope": "Namespaced",
        }
    ]
    # CREATE only: resizePolicy is immutable afterwards, and resizes go through
    # pods/resize, which this rule does not match.
    pod_rules = [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    vm_pod = hook(VM_POD_HOOK, MUTATE_POD, pod_rules)
    vm_pod["objectSelector"] = {"matchExpressions": [{"key": VM_NAME_LABEL, "operator": "Exists"}]}
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": f"{name_prefix}-mutating"},
        "webhooks": [
            {**hook(VM_DEFAULTS_HOOK, MUTATE_VM, vm_rules), "reinvocationPolicy": "Never"},
            {**vm_pod, "reinvocationPolicy": "Never"},
        ],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": f"{name_prefix}-validating"},
        "webhooks": [hook(VM_VALIDATION_HOOK, VALIDATE_VM, vm_rules)],
    }
    return mutating, validating


def _apply(kube: Kube, path: str, body: dict[str, Any]) -> None:
    name = body["metadata"]["name"]
    for _ in range(3):
        try:
            current = kube.get(f"{path}/{name}")
        except NotFound:
            try:
                kube.create(path, body)
                return
            except ApiError as exc:
                if exc.status != 409:
                    raise
                continue
        meta = {**body["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
        try:
            kube.request("PUT", f"{path}/{name}", {**body, "metadata": meta})
            return
        except Conflict:
            continue
    raise RuntimeError(f"{path}/{name} kept changing while it was being written")


def register_webhooks(
    api_client: Any,
    url_base: str,
    ca_bundle: bytes | str,
    *,
    name_prefix: str = DEFAULT_PREFIX,
    namespace_selector: dict[str, Any] | None = None,
    probe_namespace: str = "default",
    wait_s: float = 30.0,
) -> None:
    """Create or update both configurations with ``clientConfig.url`` = ``url_base`` +
    route (local use), then wait until the API server calls both webhooks: it picks
    configurations up asynchronously, and a write made before that would pass unchecked.

    ``probe_namespace`` must exist and match ``namespace_selector``; the probes are dry
    runs, nothing is stored."""
    kube = Kube(api_client)
    mutating, validating = webhook_configurations(
        ca_bundle,
        url_base=url_base,
        name_prefix=name_prefix,
        namespace_selector=namespace_selector,
    )
    _apply(kube, MUTATING_PATH, mutating)
    _apply(kube, VALIDATING_PATH, validating)
    log.info(
        "webhooks registered",
        extra={"url": url_base, "prefix": name_prefix, "selector": str(namespace_selector)},
    )
    wait_until_active(kube, probe_namespace, wait_s)


def _probe_vm(sockets: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"generateName": "chscale-webhook-probe-"},
        "spec": {"instance": {"cpu": {"sockets": sockets}, "memory": {"size": "1Gi"}}},
    }


def wait_until_active(kube: Kube, namespace: str, wait_s: float) -> None:
    """Until a dry-run VM in ``namespace`` is defaulted and an invalid one refused."""
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    deadline = time.monotonic() + wait_s
    last = "no answer yet"
    mutating = validating = False
    while True:
        if not mutating:
            try:
                created = kube.request("POST", path, _probe_vm(1), query={"dryRun": "All"})
                mutating = "resources" in (created.get("spec") or {})
                last = "a dry-run VM was not defaulted"
            except ApiError as exc:
                last = exc.message
        if mutating and not validating:
            try:
                kube.request("POST", path, _probe_vm(0), query={"dryRun": "All"})
                last = "a dry-run VM with 0 sockets was admitted"
            except ApiError as exc:
                validating = VM_VALIDATION_HOOK in exc.message
                last = exc.message
        if mutating and validating:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"the API server did not start calling the webhooks within {wait_s}s: {last}"
            )
        time.sleep(ACTIVE_POLL_S)


def unregister_webhooks(api_client: Any, name_prefix: str = DEFAULT_PREFIX) -> None:
    """Delete both configurations (absent ones are fine). With failurePolicy Fail, a
    registration left behind after its server stops blocks every VM write."""
    kube = Kube(api_client)
    kube.delete(f"{MUTATING_PATH}/{name_prefix}-mutating")
    kube.delete(f"{VALIDATING_PATH}/{name_prefix}-validating")
    log.info("webhooks unregistered", extra={"prefix": name_prefix})


def vm_lookup(kube: Kube) -> VmLookup:
    """The pod webhook's view of VirtualMachines: a GET per lookup. Only pods created
    without requests = limits need one (the controller's pods carry them)."""

    def lookup(namespace: str, name: str) -> dict[str, Any] | None:
        ns, vm = quote(namespace, safe=""), quote(name, safe="")
        path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{ns}/{PLURAL}/{vm}"
        try:
            return kube.get(path)
        except NotFound:
            return None
        except ApiError as exc:
            raise LookupFailed(f"GET {path}: {exc}") from exc

    return lookup


# --- the command line -------------------------------------------------------------------

COMMANDS = ("serve", "certs", "register", "unregister")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chscale-webhook",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the webhooks (the default command)")
    serve.add_argument("--cert", required=True, type=Path, help="PEM certificate (chain)")
    serve.add_argument("--key", required=True, type=Path, help="PEM private key")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--bind", default="127.0.0.1", help="0.0.0.0 in a pod")
    serve.add_argument(
        "--kubeconfig", help="to read a VM pod's VirtualMachine (default: in-cluster)"
    )
    serve.add_argument(
        "--pod-memory-overhead",
        default="256Mi",
        help="memory the VMM needs on top of guest RAM; the controller's value (RESIZE.md §2)",
    )
    serve.add_argument(
        "--client-ca",
        type=Path,
        help="accept only clients with a certificate from this CA (PEM): the one that signs "
        "the client certificate in the API server's admission kubeconfig (ADR 0011)",
    )
    serve.add_argument(
        "--first-request-timeout",
        type=float,
        default=Limits().first_request_s,
        help="seconds from accepting a connection to the first byte of its first request",
    )
    serve.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=Limits().max_per_peer,
        help="connections one address may hold; beyond it the oldest idle one is closed",
    )
    serve.add_argument("--log-level", default="info")
    certs = sub.add_parser("certs", help="write a self-signed CA and a serving certificate")
    certs.add_argument("--dir", required=True, type=Path)
    certs.add_argument("--dns", action="append", default=[], help="a DNS name (repeatable)")
    certs.add_argument("--ip", action="append", default=[], help="an IP address (repeatable)")
    certs.add_argument("--service", help="add the names of this Service ...")
    certs.add_argument("--namespace", default="chscale-system", help="... in this namespace")
    register = sub.add_parser("register", help="register a webhook reachable at --url")
    register.add_argument("--url", required=True, help="https://host:port (no path)")
    register.add_argument("--ca-bundle", required=True, type=Path, help="the CA's PEM file")
    register.add_argument("--kubeconfig")
    register.add_argument("--name-prefix", default=DEFAULT_PREFIX)
    unregister = sub.add_parser("unregister", help="delete the webhook configurations")
    unregister.add_argument("--kubeconfig")
    unregister.add_argument("--name-prefix", default=DEFAULT_PREFIX)
    return parser


def _certs(args: argparse.Namespace) -> int:
    dns: list[str] = list(args.dns)
    if args.service:
        dns += service_dns_names(args.service, args.namespace)
    ips: list[str] = list(args.ip)
    if not dns and not ips:
        dns, ips = ["localhost"], ["127.0.0.1"]
    write_serving_cert(args.dir, dns, ips)
    print(f"wrote {args.dir}/ca.crt, tls.crt and tls.key for {', '.join(dns + ips)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    lookup: VmLookup | None = None
    try:
        lookup = vm_lookup(Kube(load_api_client(args.kubeconfig)))
    except Exception as exc:  # no kubeconfig, no service account: serve without lookups
        log.warning(
            "no API access: VM pods without requests = limits will be refused",
            extra={"error": str(exc)},
        )
    if not (args.first_request_timeout > 0 and args.max_connections_per_peer > 0):
        log.error("--first-request-timeout and --max-connections-per-peer must be > 0")
        return 2
    limits = evolve(
        Limits(),
        first_request_s=args.first_request_timeout,
        max_per_peer=args.max_connections_per_peer,
    )
    server = WebhookServer(
        args.cert,
        args.key,
        args.bind,
        args.port,
        lookup,
        kernel_config(args),
        limits,
        client_ca=args.client_ca,
    ).start()
    log.info("webhook serving", extra={"url": server.url, "cert": str(args.cert)})
    wait_for_signal(server.stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `chscale-webhook --cert F --key F --port P` means serve.
    if args_list and args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help"):
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    if args.command == "certs":
        return _certs(args)
    if args.command == "register":
        logs.setup("info")
        register_webhooks(
            load_api_client(args.kubeconfig),
            args.url,
            args.ca_bundle.read_bytes(),
            name_prefix=args.name_prefix,
        )
        return 0
    if args.command == "unregister":
        logs.setup("info")
        unregister_webhooks(load_api_client(args.kubeconfig), args.name_prefix)
        return 0
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
