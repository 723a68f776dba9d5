"""Fixtures for tests against the real control plane (kube-apiserver + etcd, ADR 0002).

- ``control_plane`` (session): one ``ControlPlane`` for the whole run, the VirtualMachine
  CRD installed and one Ready node, ``NODE`` (``NODE_CPU`` CPUs, ``NODE_MEMORY``). There
  is no scheduler, kubelet or kube-controller-manager: a test that needs a running pod
  binds it and writes its status itself, or starts the local stack on this control plane
  (``testbed.localstack.stack.Stack(control_plane=...)``). Add nodes with
  ``control_plane.add_node(name, cpu="16", memory="32Gi", pods=110, labels=None)``
  (a Ready Node, capacity = allocatable); they stay for the rest of the session,
  so give them names no other test uses.
- ``namespace`` (per test): a fresh namespace with its ``default`` ServiceAccount
  (needed by every pod create), deleted afterwards. It then stays Terminating (no
  namespace controller), which refuses new objects in it, so nothing leaks into later
  tests; objects that need real cleanup (a VM with a finalizer) are the test's to delete.
- ``node``: the name of that node, for binding pods to it.
- ``api_client`` (per test): an official-client ``ApiClient`` as cluster admin.

A local stack started on this control plane brings its own kube-scheduler and
kube-controller-manager (ADR 0014). ``node_kind()`` is the node kind the tests that
support both run on: ``CHSCALE_NODE=real`` for a real kubelet + containerd, else
simulated; ``chscale up`` run by a test follows the same variable.

If the control plane cannot be built or started, every test using it errors: these
tests are never skipped. Every test in this directory is marked ``integration``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from adapters.k8s.client import Kube
from testbed.controlplane.build import BuildError, ControlPlaneBinaries, ensure_binaries
from testbed.controlplane.launcher import ControlPlane
from testbed.localstack.stack import Stack

NODE = "node-a"
NODE_CPU = "16"
NODE_MEMORY = "32Gi"
NAMESPACE_MAX = 63  # a DNS label
NODE_KINDS = ("simulated", "real")
# As the user set it, before the default below.
_NODE_SWITCH = os.environ.get("CHSCALE_NODE", "").strip().lower()
# `chscale up` run by a test follows the same switch (its --kubelet default): without
# it, `auto` would pick a real node on a root machine.
os.environ.setdefault("CHSCALE_NODE", "simulated")


def node_kinds() -> list[str]:
    """The node kinds a test that supports both runs on: the one ``CHSCALE_NODE`` names,
    else simulated and, where the machine allows a real node, real."""
    if _NODE_SWITCH:
        return [node_kind()]
    return ["simulated", "real"] if real_node_tests()[0] else ["simulated"]


def real_node_tests() -> tuple[bool, str]:
    """Whether the real-node tests (test_real_node.py) run, and if not why: they do
    unless ``CHSCALE_NODE=simulated`` or the machine cannot run a real node."""
    if _NODE_SWITCH == "simulated":
        return False, "CHSCALE_NODE=simulated"
    from testbed.node.realnode import machine_allows

    verdict = machine_allows(fetch=True)
    return verdict.ok, f"no real node here: {verdict.reason}"


def node_kind() -> str:
    """The node kind the stack-based tests that support both run on: ``CHSCALE_NODE``
    (``real`` or ``simulated``), ``simulated`` unless set (ADR 0014)."""
    kind = _NODE_SWITCH or "simulated"
    if kind not in NODE_KINDS:
        raise pytest.UsageError(f"CHSCALE_NODE={kind!r}: expected one of {', '.join(NODE_KINDS)}")
    return kind

_HERE = Path(__file__).parent.resolve()
_prebuilt: dict[str, ControlPlaneBinaries | BaseException] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if _HERE in Path(str(item.path)).resolve().parents]
    for item in mine:
        item.add_marker(pytest.mark.integration)
    # A first build takes minutes: do it now, visibly and before any per-test timeout
    # starts, rather than inside the first test's fixture setup.
    if any("control_plane" in getattr(item, "fixturenames", ()) for item in mine):
        capture = config.pluginmanager.getplugin("capturemanager")
        try:
            with capture.global_and_fixture_disabled():
                _prebuilt["binaries"] = ensure_binaries()
        except (BuildError, OSError) as exc:
            # Reported by the fixture, so the tests error instead of the whole session.
            _prebuilt["binaries"] = exc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test on a local stack reports the tails of its processes' logs: in CI
    that is the only trace of what the controller, kubelet or daemon saw."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack, Stack):
        # kube-controller-manager last: on a shared control plane it fills its tail with
        # other tests' namespaces, and CI keeps only the start of a long report.
        for name, child in sorted(stack.children.items(), key=_report_order):
            report.sections.append((f"{name} log (tail)", child.log_tail(40)))


def _report_order(item: tuple[str, Any]) -> tuple[bool, str]:
    return item[0] == "kube-controller-manager", item[0]


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane with the CRD and node ``NODE``; stopped at session end,
    also after a failure or Ctrl-C (its processes die with this one in any case)."""
    built = _prebuilt.get("binaries")
    if isinstance(built, BaseException):
        raise built
    binaries = built or ensure_binaries()
    # Under pytest's basetemp, so the etcd and kube-apiserver logs outlive a failed run.
    with ControlPlane(tmp_path_factory.mktemp("controlplane"), binaries=binaries) as cp:
        cp.add_node(NODE, NODE_CPU, NODE_MEMORY)
        yield cp


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of this test's own, ready for pods; deleted afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    suffix = uuid.uuid4().hex[:6]
    name = f"{slug[: NAMESPACE_MAX - len(suffix) - 1].rstrip('-')}-{suffix}"
    control_plane.create_namespace(name)
    yield name
    if control_plane.running:
        control_plane.delete_namespace(name)


@pytest.fixture
def node(control_plane: ControlPlane) -> str:
    """The name of the session's Ready node (``NODE_CPU`` CPUs, ``NODE_MEMORY``)."""
    return NODE


@pytest.fixture
def api_client(control_plane: ControlPlane) -> Iterator[k8s.ApiClient]:
    with control_plane.api_client() as client:
        yield client


@pytest.fixture
def kube(stack: Stack) -> Kube:
    """Raw JSON access to the API server of the module's ``stack`` fixture (a local
    stack sharing this session's control plane)."""
    assert stack.control_plane is not None
    return Kube(stack.control_plane.api_client())
