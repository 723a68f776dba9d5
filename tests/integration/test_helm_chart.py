"""The Helm chart (deploy/helm/chscale): it takes its CRD from deploy/crd (one file),
renders what the kustomize manifests in deploy/ apply, and its output, in both
certificate modes and with values changed, is accepted by a real API server
(`kubectl apply --server-side --dry-run=server`). helm is built from the Go module proxy
at the version pinned in testbed/controlplane/go/helm (ADR 0012)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.k8s.client import Kube
from adapters.webhook.certs import write_serving_cert
from testbed.controlplane.build import ensure_helm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "chscale"
CRD = DEPLOY / "crd" / "virtualmachines.yaml"
NAMESPACE = "chscale-system"
KUBE_VERSION = "1.35.4"  # the test control plane's
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
# Labels the chart adds to every object and deploy/ does not carry.
HELM_LABELS = {
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "helm.sh/chart",
}
CERT_MANAGER_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}


@pytest.fixture(scope="module")
def helm() -> str:
    # Built once and cached (`make test` builds it before the tests); a no-op then.
    return str(ensure_helm())


def render(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [
            helm,
            "template",
            "chscale",
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
            "--include-crds",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def without_helm_labels(obj: Any) -> Any:
    """``obj`` with the chart's own labels removed at every depth (empty label maps too)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "labels" and isinstance(v, dict):
                v = {lk: lv for lk, lv in v.items() if lk not in HELM_LABELS}
                if not v:
                    continue
            out[k] = without_helm_labels(v)
        return out
    if isinstance(obj, list):
        return [without_helm_labels(v) for v in obj]
    return obj


def deploy_docs() -> list[dict[str, Any]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or CHART in path.parents:
            continue
        found += docs(path.read_text())
    return found


def test_the_chart_takes_its_crd_from_deploy_crd(helm: str) -> None:
    linked = CHART / "crds" / "virtualmachines.yaml"
    # A link, so an edit of deploy/crd/virtualmachines.yaml is the chart's edit too.
    assert linked.is_symlink() and linked.resolve() == CRD.resolve()
    rendered = [d for d in docs(render(helm).stdout) if d["kind"] == "CustomResourceDefinition"]
    assert rendered == docs(CRD.read_text())


def test_the_chart_renders_what_deploy_applies(helm: str) -> None:
    chart = {key(d): d for d in docs(render(helm, "--set", "createNamespace=true").stdout)}
    kustomize = {key(d): d for d in deploy_docs()}
    extra = {k for k in chart.keys() - kustomize.keys()}
    # deploy/ leaves the certificate to the reader (deploy/webhook/README.md); the chart
    # asks cert-manager for it.
    assert extra == {
        ("Issuer", NAMESPACE, "chscale-selfsigned"),
        ("Certificate", NAMESPACE, "chscale-webhook"),
    }
    assert kustomize.keys() - chart.keys() == set()
    for k, want in kustomize.items():
        assert without_helm_labels(chart[k]) == want, k


def test_values_reach_the_objects(helm: str) -> None:
    out = render(
        helm,
        "--set",
        "image.repository=registry.example/chscale,image.tag=9.9.9,image.pullPolicy=Always",
        "--set",
        "controller.replicas=3,webhook.replicas=4,controller.vmmImage=registry.example/vmm:1",
        "--set",
        "controller.resources.limits.memory=1Gi,daemon.resources.requests.cpu=250m",
        "--set-json",
        'controller.extraArgs=["--workers=8"]',
        "--set-json",
        'daemon.nodeSelector={"chscale.io/vms":"true"}',
        "--set-json",
        'daemon.tolerations=[{"key":"vms","operator":"Exists","effect":"NoSchedule"}]',
    ).stdout
    objs = {key(d): d for d in docs(out)}
    controller = objs[("Deployment", NAMESPACE, "chscale-controller")]
    webhook = objs[("Deployment", NAMESPACE, "chscale-webhook")]
    daemon = objs[("DaemonSet", NAMESPACE, "chscale-daemon")]
    assert controller["spec"]["replicas"] == 3 and webhook["spec"]["replicas"] == 4
    for obj in (controller, webhook, daemon):
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/chscale:9.9.9"
        assert container["imagePullPolicy"] == "Always"
    (c,) = controller["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["memory"] == "1Gi"
    assert c["args"][-2:] == ["--image=registry.example/vmm:1", "--workers=8"]
    pod = daemon["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"chscale.io/vms": "true"}
    assert pod["tolerations"][0]["key"] == "vms"
    assert pod["containers"][0]["resources"]["requests"]["cpu"] == "250m"


def test_bad_certificate_values_fail_with_the_field_named(helm: str) -> None:
    bogus = render(helm, "--set", "webhook.certificates.mode=bogus", check=False)
    assert bogus.returncode != 0
    assert "webhook.certificates.mode: must be certManager or secret" in bogus.stderr
    no_ca = render(helm, "--set", "webhook.certificates.mode=secret", check=False)
    assert no_ca.returncode != 0
    assert "webhook.certificates.caBundle: required" in no_ca.stderr


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("controller.replicas=0", "/controller/replicas"),
        ("daemon.metrics.port=metrics", "/daemon/metrics/port"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("daemon.vmmSocketRoot=relative/path", "/daemon/vmmSocketRoot"),
    ],
)
def test_bad_values_are_refused_by_the_schema_naming_the_field(
    helm: str, value: str, named: str
) -> None:
    done = render(helm, "--set", value, check=False)
    assert done.returncode != 0
    assert named in done.stderr


def _ensure_namespace(kube: Kube) -> None:
    try:
        kube.create("/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
    except Exception as exc:  # there from an earlier test: fine
        assert "AlreadyExists" in str(exc) or "already exists" in str(exc)


def server_dry_run(control_plane: Any, manifests: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            KUBECTL,
            "apply",
            "--server-side",
            "--dry-run=server",
            # The session's control plane already has the CRD, applied by another manager.
            "--force-conflicts",
            "--field-manager=helm-chart-check",
            "-f",
            "-",
        ],
        input=manifests,
        env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("mode", ["certManager", "secret"])
def test_the_rendered_chart_passes_a_server_side_dry_run(
    helm: str, control_plane: Any, tmp_path: Path, mode: str
) -> None:
    assert Path(KUBECTL).exists(), "kubectl is needed to apply the chart's output"
    _ensure_namespace(Kube(control_plane.api_client()))
    args = ["--set", "createNamespace=true"]
    if mode == "secret":
        bundle = write_serving_cert(tmp_path, dns_names=[f"chscale-webhook.{NAMESPACE}.svc"])
        args += [
            "--set",
            "webhook.certificates.mode=secret",
            "--set",
            f"webhook.certificates.caBundle={base64.b64encode(bundle).decode()}",
        ]
    rendered = docs(render(helm, *args).stdout)
    # The test control plane has no cert-manager: its two objects are checked by shape.
    cert_manager = [d for d in rendered if (d["apiVersion"], d["kind"]) in CERT_MANAGER_KINDS]
    if mode == "certManager":
        (certificate,) = [d for d in cert_manager if d["kind"] == "Certificate"]
        assert certificate["spec"]["secretName"] == "chscale-webhook-tls"
        assert certificate["spec"]["dnsNames"][0] == f"chscale-webhook.{NAMESPACE}.svc"
    else:
        assert cert_manager == []
    rest = [d for d in rendered if d not in cert_manager]
    applied = server_dry_run(control_plane, yaml.safe_dump_all(rest))
    assert applied.returncode == 0, applied.stderr
    lines = applied.stdout.splitlines()
    assert len(lines) == len(rest), applied.stdout
    assert all(line.endswith("(server dry run)") for line in lines), applied.stdout
    webhooks = [d for d in rest if d["kind"].endswith("WebhookConfiguration")]
    for config in webhooks:
        injected = (config["metadata"].get("annotations") or {}).get(
            "cert-manager.io/inject-ca-from"
        )
        bundles = {w["clientConfig"].get("caBundle") for w in config["webhooks"]}
        if mode == "certManager":
            assert injected == f"{NAMESPACE}/chscale-webhook" and bundles == {""}
        else:
            assert injected is None and bundles == {base64.b64encode(bundle).decode()}
