"""chscale-webhook: the admission webhooks (defaulting and validation), over HTTPS.

chscale-webhook serve --cert tls.crt --key tls.key [--port 9443] [--kubeconfig K]
chscale-webhook certs --dir D --dns localhost --ip 127.0.0.1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from adapters.k8s.client import ApiError, Kube, NotFound, load_api_client
from adapters.webhook.certs import write_serving_cert
from adapters.webhook.server import WebhookServer
from apps.common import logs
from apps.common.runtime import wait_for_signal
from core.constants import API_GROUP, API_VERSION, KIND, PLURAL, VM_NAME_LABEL

log = logging.getLogger("chscale.webhook")

ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def _configurations(prefix: str, url_base: str, ca_bundle: bytes) -> list[tuple[str, dict]]:
    import base64

    ca = base64.b64encode(ca_bundle).decode()

    def hook(name: str, route: str, rules: list[dict], **extra: Any) -> dict[str, Any]:
        return {
            "name": f"{name}.{API_GROUP}",
            "clientConfig": {"url": f"{url_base}{route}", "caBundle": ca},
            "rules": rules,
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "admissionReviewVersions": ["v1"],
            **extra,
        }

    vm_rules = [
        {
            "apiGroups": [API_GROUP],
            "apiVersions": [API_VERSION],
            "operations": ["CREATE", "UPDATE"],
            "resources": [PLURAL],
            "scope": "Namespaced",
        }
    ]
    pod_rules = [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    only_vm_pods = {"matchExpressions": [{"key": VM_NAME_LABEL, "operator": "Exists"}]}
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": f"{prefix}-mutating"},
        "webhooks": [
            hook("vm-defaults", "/mutate-vm", vm_rules, reinvocationPolicy="Never"),
            hook("vm-pod", "/mutate-pod", pod_rules, objectSelector=only_vm_pods),
        ],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": f"{prefix}-validating"},
        "webhooks": [hook("vm-validation", "/validate-vm", vm_rules)],
    }
    return [
        (f"{ADMISSION}/mutatingwebhookconfigurations", mutating),
        (f"{ADMISSION}/validatingwebhookconfigurations", validating),
    ]


def register_webhooks(
    api_client: Any,
    url_base: str,
    ca_bundle: bytes,
    name_prefix: str = "chscale",
    wait_s: float = 30.0,
) -> None:
    """Create or update both configurations (local use: URL client config), then wait
    until the API server really calls the validating webhook."""
    kube = Kube(api_client)
    for path, body in _configurations(name_prefix, url_base, ca_bundle):
        name = body["metadata"]["name"]
        try:
            current = kube.get(f"{path}/{name}")
        except NotFound:
            kube.create(path, body)
        else:
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            kube.request("PUT", f"{path}/{name}", body)
    _wait_until_active(kube, wait_s)


def _wait_until_active(kube: Kube, wait_s: float) -> None:
    """The API server picks configurations up asynchronously: probe with a dry run of an
    invalid VM until our validation refuses it."""
    probe = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": "chscale-webhook-probe", "namespace": "default"},
        "spec": {"instance": {"cpu": {"sockets": 0}, "memory": {"size": "1Gi"}}},
    }
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/default/{PLURAL}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            kube.request("POST", path, probe, query={"dryRun": "All"})
        except ApiError as exc:
            if "spec.instance.cpu.sockets" in exc.message:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the API server did not start calling the webhook within {wait_s}s")


def unregister_webhooks(api_client: Any, name_prefix: str = "chscale") -> None:
    kube = Kube(api_client)
    for path, kind in (
        (f"{ADMISSION}/mutatingwebhookconfigurations", "mutating"),
        (f"{ADMISSION}/validatingwebhookconfigurations", "validating"),
    ):
        kube.delete(f"{path}/{name_prefix}-{kind}")


def _vm_lookup(kube: Kube) -> Any:
    def lookup(namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return kube.get(
                f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
            )
        except ApiError:
            return None

    return lookup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chscale-webhook",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--cert", required=True, type=Path)
    serve.add_argument("--key", required=True, type=Path)
    serve.add_argument("--port", type=int, default=9443)
    serve.add_argument("--bind", default="127.0.0.1")
    serve.add_argument("--kubeconfig", help="to look up a VM pod's VirtualMachine")
    serve.add_argument("--log-level", default="info")
    certs = sub.add_parser("certs")
    certs.add_argument("--dir", required=True, type=Path)
    certs.add_argument("--dns", action="append", default=[])
    certs.add_argument("--ip", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "certs":
        write_serving_cert(args.dir, args.dns or ["localhost"], args.ip)
        print(f"wrote {args.dir}/ca.crt, tls.crt, tls.key")
        return 0
    logs.setup(args.log_level)
    lookup = None
    try:
        lookup = _vm_lookup(Kube(load_api_client(args.kubeconfig)))
    except Exception as exc:  # no API access: pods keep their own values
        log.warning("no API access; VM pods keep their own resources", extra={"error": str(exc)})
    server = WebhookServer(args.cert, args.key, args.bind, args.port, lookup)
    server.start()
    log.info("webhook serving", extra={"url": server.url})
    wait_for_signal(server.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
