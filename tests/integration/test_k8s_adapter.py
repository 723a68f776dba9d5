"""The Kubernetes adapter's infrastructure against the real kube-apiserver: informers
(list+watch, selectors, observe_write, relist after 410), event aggregation, leader
election on a Lease, and the typed client helpers (errors, status writes, pods/resize).
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from kubernetes import client as k8s

from adapters.k8s.client import (
    AlreadyExists,
    ApiError,
    Conflict,
    Forbidden,
    Kube,
    NotFound,
    WatchStream,
    get_json,
    load_api_client,
    node_capacity_refusal,
    patch_json,
    resize_pod,
    resource_path,
    update_status,
)
from adapters.k8s.events import EventRecorder
from adapters.k8s.informer import DELETED, Informer
from adapters.k8s.leader import LeaderElector

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "cloudhypervisor.quill.today", "v1beta1", "virtualmachines"
WAIT_S = 30.0
POLL_S = 0.05
IMAGE = "registry.invalid/vm-manager:test"


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")


class Seen:
    """What an informer's handler was told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        with self._lock:
            self.events.append((event, meta["name"], meta.get("resourceVersion")))

    def names(self, event: str) -> list[str]:
        with self._lock:
            return [name for ev, name, _ in self.events if ev == event]

    def wait(self, event: str, name: str) -> None:
        wait_for(f"{event} {name}", lambda: name in self.names(event))


@pytest.fixture
def kube(api_client: k8s.ApiClient) -> Kube:
    return Kube(api_client)


@pytest.fixture
def informers() -> Iterator[list[Informer]]:
    started: list[Informer] = []
    yield started
    for informer in started:
        informer.stop()


def run(informers: list[Informer], informer: Informer, seen: Seen | None = None) -> Informer:
    if seen is not None:
        informer.add_handler(seen)
    informers.append(informer)
    informer.start()
    assert informer.wait_synced(WAIT_S)
    return informer


def pod_manifest(name: str, labels: dict[str, str] | None = None, node: str | None = None) -> dict:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": IMAGE}]}
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }


def pods_path(namespace: str, name: str | None = None, sub: str | None = None) -> str:
    return resource_path("", "v1", "pods", namespace, name, sub)


def vms_path(namespace: str, name: str | None = None, sub: str | None = None) -> str:
    return resource_path(GROUP, VERSION, PLURAL, namespace, name, sub)


def vm_manifest(name: str, vcpus: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "instance": {"cpu": {"sockets": 1, "coresPerSocket": vcpus}, "memory": {"size": "1Gi"}}
        },
    }


def delete_now(kube: Kube, path: str) -> None:
    kube.delete(path, grace_period_seconds=0)


# --- informers ------------------------------------------------------------------------------


def test_informer_follows_pods_through_create_update_delete(
    kube: Kube, namespace: str, informers: list[Informer]
) -> None:
    kube.create(pods_path(namespace), pod_manifest("before"))
    seen = Seen()
    inf = run(informers, Informer(kube, plural="pods", namespace=namespace), seen)
    assert seen.names("ADDED") == ["before"]  # the initial listing
    assert inf.get(namespace, "before")["kind"] == "Pod"  # filled in for list items

    created = kube.create(pods_path(namespace), pod_manifest("p1"))
    seen.wait("ADDED", "p1")
    kube.patch(pods_path(namespace, "p1"), {"metadata": {"labels": {"color": "blue"}}})
    seen.wait("MODIFIED", "p1")
    assert inf.get(namespace, "p1")["metadata"]["labels"] == {"color": "blue"}
    assert int(inf.get(namespace, "p1")["metadata"]["resourceVersion"]) > int(
        created["metadata"]["resourceVersion"]
    )
    delete_now(kube, pods_path(namespace, "p1"))
    seen.wait("DELETED", "p1")
    assert inf.get(namespace, "p1") is None
    assert [o["metadata"]["name"] for o in inf.list()] == ["before"]


def test_informer_selectors_confine_the_cache(
    kube: Kube, namespace: str, node: str, informers: list[Informer]
) -> None:
    on_node = run(
        informers,
        Informer(kube, plural="pods", namespace=namespace, field_selector=f"spec.nodeName={node}"),
    )
    labelled = run(
        informers, Informer(kube, plural="pods", namespace=namespace, label_selector="tier=vm")
    )
    kube.create(pods_path(namespace), pod_manifest("bound", node=node))
    kube.create(pods_path(namespace), pod_manifest("vm", labels={"tier": "vm"}))
    kube.create(pods_path(namespace), pod_manifest("neither"))
    wait_for("the bound pod", lambda: on_node.get(namespace, "bound"))
    wait_for("the labelled pod", lambda: labelled.get(namespace, "vm"))
    # A marker both would see proves the others were delivered (and filtered) before it.
    kube.create(pods_path(namespace), pod_manifest("marker", labels={"tier": "vm"}, node=node))
    wait_for(
        "the marker", lambda: on_node.get(namespace, "marker") and labelled.get(namespace, "marker")
    )
    assert sorted(o["metadata"]["name"] for o in on_node.list()) == ["bound", "marker"]
    assert sorted(o["metadata"]["name"] for o in labelled.list()) == ["marker", "vm"]


def test_informer_follows_virtual_machines(
    kube: Kube, namespace: str, informers: list[Informer]
) -> None:
    seen = Seen()
    inf = run(
        informers,
        Informer(kube, group=GROUP, version=VERSION, plural=PLURAL, namespace=namespace),
        seen,
    )
    kube.create(vms_path(namespace), vm_manifest("vm1"))
    seen.wait("ADDED", "vm1")
    kube.patch(
        vms_path(namespace, "vm1"),
        {"spec": {"instance": {"cpu": {"sockets": 1, "coresPerSocket": 4}}}},
    )
    wait_for(
        "the new vCPU count",
        lambda: inf.get(namespace, "vm1")["spec"]["instance"]["cpu"]["coresPerSocket"] == 4,
    )
    assert inf.get(namespace, "vm1")["kind"] == "VirtualMachine"
    kube.delete(vms_path(namespace, "vm1"))
    seen.wait("DELETED", "vm1")
    assert inf.get(namespace, "vm1") is None
    assert [ev for ev, name, _ in seen.events if name == "vm1"] == ["ADDED", "MODIFIED", "DELETED"]


def test_informer_follows_cluster_scoped_nodes(
    control_plane: Any, kube: Kube, node: str, informers: list[Informer]
) -> None:
    seen = Seen()
    inf = run(informers, Informer(kube, plural="nodes"), seen)
    assert inf.get("", node)["kind"] == "Node"
    name = f"adapter-node-{uuid.uuid4().hex[:6]}"
    control_plane.add_node(name, "2", "4Gi")
    seen.wait("ADDED", name)
    assert inf.get("", name)["status"]["capacity"]["cpu"] == "2"


def test_cached_objects_are_read_only_and_deep_copies_are_not(
    kube: Kube, namespace: str, informers: list[Informer]
) -> None:
    kube.create(pods_path(namespace), pod_manifest("p", labels={"a": "1"}))
    inf = run(informers, Informer(kube, plural="pods", namespace=namespace))
    pod = inf.get(namespace, "p")
    with pytest.raises(TypeError, match="read-only"):
        pod["metadata"]["labels"]["a"] = "2"
    with pytest.raises(TypeError, match="read-only"):
        pod["spec"]["containers"].append({})
    with pytest.raises(TypeError, match="read-only"):
        pod["metadata"].setdefault("annotations", {})
    mine = copy.deepcopy(pod)
    mine["metadata"]["labels"]["a"] = "2"
    mine["spec"]["containers"].append({"name": "extra"})
    assert inf.get(namespace, "p")["metadata"]["labels"] == {"a": "1"}
    assert json.loads(json.dumps(pod)) == pod  # still plain JSON for writes


def test_observe_write_shows_our_write_before_its_watch_event(
    kube: Kube, namespace: str, informers: list[Informer]
) -> None:
    gate = threading.Event()
    stalled = threading.Event()

    def stall_on_blocker(event: str, obj: Mapping[str, Any]) -> None:
        # Holds the informer's thread, so no watch event after "blocker" is applied.
        if obj["metadata"]["name"] == "blocker" and event == "ADDED":
            stalled.set()
            gate.wait(WAIT_S)

    seen = Seen()
    inf = Informer(kube, group=GROUP, version=VERSION, plural=PLURAL, namespace=namespace)
    inf.add_handler(stall_on_blocker)
    run(informers, inf, seen)
    try:
        before = kube.create(vms_path(namespace), vm_manifest("vm"))
        seen.wait("ADDED", "vm")
        kube.create(vms_path(namespace), vm_manifest("blocker"))
        assert stalled.wait(WAIT_S)
        written = kube.patch(vms_path(namespace, "vm"), {"metadata": {"labels": {"w": "1"}}})
        assert (
            inf.get(namespace, "vm")["metadata"]["resourceVersion"]
            == before["metadata"]["resourceVersion"]
        )  # the watch is held back: without observe_write we would read the old view
        assert inf.observe_write(written)
        assert inf.get(namespace, "vm")["metadata"]["labels"] == {"w": "1"}
        assert not inf.observe_write(before)  # an older answer never goes backwards
        assert inf.get(namespace, "vm")["metadata"]["labels"] == {"w": "1"}
    finally:
        gate.set()
    # The watch event for our write arrives later and changes nothing visible.
    wait_for(
        "the watch to catch up", lambda: "blocker" in [o["metadata"]["name"] for o in inf.list()]
    )
    seen.wait("MODIFIED", "vm")
    assert (
        inf.get(namespace, "vm")["metadata"]["resourceVersion"]
        == written["metadata"]["resourceVersion"]
    )


class GatedKube(Kube):
    """Plays an informer that lost its watch for a while: when armed, its next watch
    waits until the test has changed things behind its back (and optionally resumes from
    ``resume_from`` instead of the informer's own resourceVersion)."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        super().__init__(api_client)
        self.armed = threading.Event()
        self.reconnecting = threading.Event()
        self.resume = threading.Event()
        self.resume_from: str | None = None
        self.resumed_at: str | None = None

    def open_watch(self, path: str, query: Mapping[str, Any], timeout: float) -> WatchStream:
        if self.armed.is_set():
            self.armed.clear()
            self.reconnecting.set()
            self.resume.wait(WAIT_S)
            if self.resume_from is not None:
                query = {**query, "resourceVersion": self.resume_from}
            self.resumed_at = str(query["resourceVersion"])
        return super().open_watch(path, query, timeout)


def compact_etcd(control_plane: Any) -> int:
    """Compact etcd up to its current revision (kube-apiserver does this every few
    minutes in a cluster); returns that revision."""

    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            control_plane.etcd_url + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return json.loads(response.read())

    revision = call("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"]
    call("/v3/kv/compaction", {"revision": revision, "physical": True})
    return int(revision)


def event_manifest(namespace: str, name: str, message: str = "m") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": "x"},
        "type": "Normal",
        "reason": "Test",
        "message": message,
        "source": {"component": "test"},
    }


def expired_watches(caplog: pytest.LogCaptureFixture, informer: Informer) -> list[str]:
    return [
        r.error
        for r in caplog.records
        if r.getMessage() == "watch expired; relisting" and r.informer == informer.name
    ]


def test_an_informer_whose_resume_point_was_compacted_relists_and_loses_nothing(
    api_client: k8s.ApiClient,
    control_plane: Any,
    namespace: str,
    informers: list[Informer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="adapters.k8s.informer")
    # Events are the resource kube-apiserver watches straight from etcd (no watch
    # cache), so compacting etcd expires the informer's own resourceVersion, as a long
    # disconnection from a real cluster does.
    kube = GatedKube(api_client)
    events = resource_path("", "v1", "events", namespace)
    for name in ("a", "b", "c"):
        kube.create(events, event_manifest(namespace, name))
    seen = Seen()
    inf = Informer(kube, plural="events", namespace=namespace, watch_timeout=1)
    run(informers, inf, seen)
    relists = inf.relists
    kube.armed.set()
    assert kube.reconnecting.wait(WAIT_S)
    own_rv = inf.resource_version
    # While the informer is away: a delete, a create, an update; then etcd forgets them.
    kube.delete(f"{events}/b")
    kube.create(events, event_manifest(namespace, "d"))
    kube.patch(f"{events}/a", {"message": "changed"})
    assert compact_etcd(control_plane) > int(own_rv or 0)
    kube.resume.set()

    wait_for("the relist", lambda: inf.relists > relists)
    assert kube.resumed_at == own_rv  # its own resourceVersion, expired by the compaction
    assert inf.relists == relists + 1
    (expired,) = expired_watches(caplog, inf)  # the server said 410, nothing else failed
    assert "too old" in expired
    assert sorted(o["metadata"]["name"] for o in inf.list()) == ["a", "c", "d"]
    assert inf.get(namespace, "a")["message"] == "changed"
    assert seen.names(DELETED) == ["b"]  # synthetic: the watch that would have said so is lost
    assert "d" in seen.names("ADDED")
    assert "a" in seen.names("MODIFIED")
    kube.create(events, event_manifest(namespace, "e"))  # and it watches on
    seen.wait("ADDED", "e")


def test_a_watch_too_old_for_the_watch_cache_relists_and_loses_nothing(
    api_client: k8s.ApiClient,
    namespace: str,
    informers: list[Informer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="adapters.k8s.informer")
    kube = GatedKube(api_client)
    for name in ("a", "b", "c"):
        kube.create(vms_path(namespace), vm_manifest(name))
    seen = Seen()
    inf = Informer(
        kube, group=GROUP, version=VERSION, plural=PLURAL, namespace=namespace, watch_timeout=1
    )
    run(informers, inf, seen)
    relists = inf.relists
    kube.resume_from = "1"  # older than the watch cache's window: "too old resource version"
    kube.armed.set()
    assert kube.reconnecting.wait(WAIT_S)
    kube.delete(vms_path(namespace, "b"))
    kube.create(vms_path(namespace), vm_manifest("d"))
    kube.patch(vms_path(namespace, "a"), {"metadata": {"labels": {"v": "2"}}})
    kube.resume.set()

    wait_for("the relist", lambda: inf.relists > relists)
    assert inf.relists == relists + 1
    (expired,) = expired_watches(caplog, inf)
    assert "too old resource version: 1" in expired
    assert sorted(o["metadata"]["name"] for o in inf.list()) == ["a", "c", "d"]
    assert inf.get(namespace, "a")["metadata"]["labels"] == {"v": "2"}
    assert seen.names(DELETED) == ["b"]
    kube.create(vms_path(namespace), vm_manifest("e"))
    seen.wait("ADDED", "e")


def test_stop_ends_an_open_watch_promptly(
    kube: Kube, namespace: str, informers: list[Informer]
) -> None:
    seen = Seen()
    inf = run(informers, Informer(kube, plural="pods", namespace=namespace, name="stoppable"), seen)
    kube.create(pods_path(namespace), pod_manifest("p"))
    seen.wait("ADDED", "p")  # delivered by the watch: it is open now
    (thread,) = [t for t in threading.enumerate() if t.name == "informer:stoppable"]
    inf.stop(timeout=WAIT_S)
    # The server would hold this watch open for minutes: stop() closed it.
    assert not thread.is_alive()


# --- events -------------------------------------------------------------------------------------


def events_about(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = get_json(
        kube,
        resource_path("", "v1", "events", namespace),
        query={"fieldSelector": f"involvedObject.name={name}"},
    )
    return listing["items"]


def test_repeated_events_bump_the_count_of_one_event(kube: Kube, namespace: str) -> None:
    vm = kube.create(vms_path(namespace), vm_manifest("ev"))
    recorder = EventRecorder(kube, "chscale-test", host="test-host")
    for _ in range(3):
        recorder.record(vm, "Warning", "VMPodResizeInfeasible", "node-a is full")
    recorder.record(vm, "Normal", "Resized", "2 -> 4 vCPUs")
    events = sorted(events_about(kube, namespace, "ev"), key=lambda e: e["reason"])
    assert [(e["reason"], e["count"]) for e in events] == [
        ("Resized", 1),
        ("VMPodResizeInfeasible", 3),
    ]
    infeasible = events[1]
    assert infeasible["type"] == "Warning"
    assert infeasible["involvedObject"]["uid"] == vm["metadata"]["uid"]
    assert infeasible["involvedObject"]["kind"] == "VirtualMachine"
    assert infeasible["source"] == {"component": "chscale-test", "host": "test-host"}
    assert infeasible["lastTimestamp"] >= infeasible["firstTimestamp"]
    assert (recorder.written, recorder.aggregated, recorder.failed) == (2, 2, 0)


def test_an_event_the_server_refuses_is_logged_not_raised(kube: Kube, namespace: str) -> None:
    recorder = EventRecorder(kube, "chscale-test")
    ghost = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "no-such-namespace-x", "name": "p", "uid": "u"},
    }
    recorder.record(ghost, "Normal", "R", "m")
    assert recorder.failed == 1


# --- leader election ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Callbacks:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped = threading.Event()


def elector(
    api_client: k8s.ApiClient,
    namespace: str,
    identity: str,
    clock: Callable[[], float] = time.monotonic,
    callbacks: Callbacks | None = None,
    **kwargs: Any,
) -> LeaderElector:
    callbacks = callbacks or Callbacks()
    settings: dict[str, Any] = {"lease_duration": 6.0, "renew_deadline": 4.0, "retry_period": 1.0}
    settings.update(kwargs)
    return LeaderElector(
        api_client,
        namespace,
        "chscale-test",
        identity,
        on_started_leading=callbacks.started.set,
        on_stopped_leading=callbacks.stopped.set,
        clock=clock,
        **settings,
    )


def lease(kube: Kube, namespace: str) -> dict[str, Any]:
    path = resource_path("coordination.k8s.io", "v1", "leases", namespace, "chscale-test")
    return kube.get(path)["spec"]


def test_one_leads_and_the_other_takes_over_only_once_the_lease_runs_out(
    api_client: k8s.ApiClient, kube: Kube, namespace: str
) -> None:
    clock = FakeClock()
    a_calls = Callbacks()
    a = elector(api_client, namespace, "a", clock, a_calls, release_on_stop=False)
    b = elector(api_client, namespace, "b", clock)
    assert a.step()
    assert a_calls.started.wait(WAIT_S)
    assert not b.step()
    spec = lease(kube, namespace)
    assert spec["holderIdentity"] == "a"
    assert spec["leaseDurationSeconds"] == 6
    assert spec["renewTime"].endswith("Z") and len(spec["renewTime"].split(".")[1]) == 7
    # a dies (stops renewing). b must wait a full lease duration from its first look.
    clock.t += 5.9
    assert not b.step()
    assert not a.is_leader()  # past a's renew deadline: a stops believing it leads
    clock.t += 0.2
    assert b.step()
    spec = lease(kube, namespace)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("b", 1)
    assert not a.step()  # a comes back and sees b holding it
    assert a_calls.stopped.is_set()


def test_the_leader_keeps_the_lease_while_it_renews(
    api_client: k8s.ApiClient, kube: Kube, namespace: str
) -> None:
    clock = FakeClock()
    a = elector(api_client, namespace, "a", clock)
    b = elector(api_client, namespace, "b", clock)
    assert a.step()
    for _ in range(5):
        clock.t += 3  # more than the lease duration in all, within it between renewals
        assert a.step()
        assert not b.step()
    assert lease(kube, namespace)["leaseTransitions"] == 0


def test_a_released_lease_is_taken_at_once(
    api_client: k8s.ApiClient, kube: Kube, namespace: str
) -> None:
    clock = FakeClock()
    a_calls = Callbacks()
    a = elector(api_client, namespace, "a", clock, a_calls)
    b = elector(api_client, namespace, "b", clock)
    assert a.step()
    assert not b.step()
    assert a.release()
    assert a_calls.stopped.is_set()
    assert not a.is_leader()
    assert lease(kube, namespace)["holderIdentity"] == ""
    assert b.step()  # no clock advance: the release made it free
    assert lease(kube, namespace)["holderIdentity"] == "b"


def test_racing_candidates_never_both_win(
    api_client: k8s.ApiClient, kube: Kube, namespace: str
) -> None:
    clock = FakeClock()
    candidates = [elector(api_client, namespace, name, clock) for name in ("a", "b", "c")]
    for _ in range(4):
        barrier = threading.Barrier(len(candidates))
        results: dict[str, bool] = {}

        def campaign(
            e: LeaderElector,
            barrier: threading.Barrier = barrier,
            results: dict[str, bool] = results,
        ) -> None:
            barrier.wait(WAIT_S)
            results[e.identity] = e.step()

        threads = [threading.Thread(target=campaign, args=(e,)) for e in candidates]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        winners = [name for name, won in results.items() if won]
        assert len(winners) == 1, results
        assert lease(kube, namespace)["holderIdentity"] == winners[0]
        next(e for e in candidates if e.identity == winners[0]).release()


def test_running_electors_hand_over_on_a_graceful_stop(
    api_client: k8s.ApiClient, kube: Kube, namespace: str
) -> None:
    # A lease far longer than the wait below: only the release can explain a takeover.
    settings = {"lease_duration": 120.0, "renew_deadline": 60.0, "retry_period": 0.5}
    calls = {name: Callbacks() for name in ("a", "b")}
    electors = {
        name: elector(api_client, namespace, name, callbacks=calls[name], **settings)
        for name in ("a", "b")
    }
    threads = {
        name: threading.Thread(target=e.run, name=f"elector-{name}", daemon=True)
        for name, e in electors.items()
    }
    for t in threads.values():
        t.start()
    try:
        leader = wait_for(
            "a leader", lambda: next((n for n, e in electors.items() if e.is_leader()), None)
        )
        standby = "b" if leader == "a" else "a"
        for _ in range(10):  # several renewals: never two leaders
            assert [n for n, e in electors.items() if e.is_leader()] == [leader]
            time.sleep(0.2)
        electors[leader].stop()
        threads[leader].join(WAIT_S)
        assert calls[leader].stopped.is_set()
        assert calls[standby].started.wait(WAIT_S)
        assert electors[standby].is_leader()
        spec = lease(kube, namespace)
        assert (spec["holderIdentity"], spec["leaseTransitions"]) == (standby, 1)
    finally:
        for e in electors.values():
            e.stop()
        for t in threads.values():
            t.join(WAIT_S)
    assert lease(kube, namespace)["holderIdentity"] == ""


# --- client helpers -------------------------------------------------------------------------


def test_errors_are_typed(kube: Kube, namespace: str) -> None:
    with pytest.raises(NotFound) as not_found:
        kube.get(pods_path(namespace, "nope"))
    assert not_found.value.status == 404
    kube.create(pods_path(namespace), pod_manifest("p"))
    with pytest.raises(AlreadyExists):
        kube.create(pods_path(namespace), pod_manifest("p"))
    with pytest.raises(ApiError) as invalid:
        kube.create(pods_path(namespace), {"apiVersion": "v1", "kind": "Pod", "metadata": {}})
    assert invalid.value.status == 422
    assert invalid.value.reason == "Invalid"
    assert any(c.get("field") == "metadata.name" for c in invalid.value.causes)


def test_a_forbidden_request_is_typed_and_not_a_capacity_refusal(
    control_plane: Any, kube: Kube, namespace: str
) -> None:
    token_request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
    token = kube.create(
        resource_path("", "v1", "serviceaccounts", namespace, "default", "token"), token_request
    )["status"]["token"]
    configuration = k8s.Configuration(
        host=control_plane.server_url, ssl_ca_cert=str(control_plane.ca_cert_path)
    )
    configuration.api_key = {"authorization": f"Bearer {token}"}
    with k8s.ApiClient(configuration) as unprivileged, pytest.raises(Forbidden) as refused:
        get_json(unprivileged, resource_path("", "v1", "nodes"))
    assert refused.value.status == 403
    assert "forbidden" in refused.value.message
    assert node_capacity_refusal(refused.value) is None


def test_load_api_client_reads_a_kubeconfig(control_plane: Any) -> None:
    with load_api_client(str(control_plane.kubeconfig_path)) as client:
        listing = get_json(client, resource_path("", "v1", "namespaces"), {"limit": 1})
    assert listing["kind"] == "NamespaceList"


def test_update_status_replaces_status_conditionally(kube: Kube, namespace: str) -> None:
    vm = kube.create(vms_path(namespace), vm_manifest("st"))
    status = {"phase": "Running", "conditions": []}
    written = update_status(kube, GROUP, VERSION, PLURAL, vm, status)
    assert written["status"]["phase"] == "Running"
    assert int(written["metadata"]["resourceVersion"]) > int(vm["metadata"]["resourceVersion"])
    with pytest.raises(Conflict):
        update_status(kube, GROUP, VERSION, PLURAL, vm, {"phase": "Pending"})  # stale read
    again = update_status(kube, GROUP, VERSION, PLURAL, written, {"phase": "Pending"})
    assert again["status"] == {"phase": "Pending"}  # replaced, not merged
    assert again["spec"] == vm["spec"]


def test_patch_json_speaks_all_three_patch_types(kube: Kube, namespace: str) -> None:
    kube.create(vms_path(namespace), vm_manifest("pt"))
    path = vms_path(namespace, "pt")
    merged = patch_json(kube, path, {"metadata": {"labels": {"m": "1"}}}, "merge")
    assert merged["metadata"]["labels"] == {"m": "1"}
    ops = [
        {"op": "test", "path": "/metadata/labels/m", "value": "1"},
        {"op": "add", "path": "/metadata/labels/j", "value": "2"},
    ]
    assert patch_json(kube, path, ops, "json")["metadata"]["labels"] == {"m": "1", "j": "2"}
    stale = [{"op": "test", "path": "/metadata/labels/m", "value": "0"}, ops[1]]
    with pytest.raises(ApiError) as failed:
        patch_json(kube, path, stale, "json")
    assert failed.value.status == 422
    pod = kube.create(pods_path(namespace), pod_manifest("sp"))
    strategic = patch_json(
        kube,
        pods_path(namespace, "sp"),
        {"spec": {"containers": [{"name": "c", "image": "registry.invalid/other:1"}]}},
        "strategic",
    )
    assert [c["image"] for c in strategic["spec"]["containers"]] == ["registry.invalid/other:1"]
    assert strategic["metadata"]["uid"] == pod["metadata"]["uid"]
    with pytest.raises(ValueError, match="patch_type"):
        patch_json(kube, path, {}, "apply")  # type: ignore[arg-type]


def test_resize_pod_bumps_the_generation(
    api_client: k8s.ApiClient, kube: Kube, namespace: str, node: str
) -> None:
    values = {"cpu": "1", "memory": "1Gi"}
    container = {
        "name": "vm-manager",
        "image": IMAGE,
        "resources": {"requests": values, "limits": values},
        "resizePolicy": [
            {"resourceName": "cpu", "restartPolicy": "NotRequired"},
            {"resourceName": "memory", "restartPolicy": "NotRequired"},
        ],
    }
    name = f"resize-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [container]},
    }
    kube.create(pods_path(namespace), body)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    running = {
        "status": {
            "phase": "Running",
            "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [
                {
                    "name": "vm-manager",
                    "image": IMAGE,
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                    "allocatedResources": values,
                    "resources": {"requests": values, "limits": values},
                }
            ],
        }
    }
    pod = patch_json(kube, pods_path(namespace, name, "status"), running, "strategic")
    assert pod["status"]["phase"] == "Running"
    generation = pod["metadata"]["generation"]

    resized = resize_pod(api_client, namespace, name, "vm-manager", "2", "2Gi")
    assert resized["metadata"]["generation"] > generation
    (spec,) = resized["spec"]["containers"]
    assert (
        spec["resources"]["requests"]
        == spec["resources"]["limits"]
        == {
            "cpu": "2",
            "memory": "2Gi",
        }
    )
    assert resized["metadata"]["uid"] == pod["metadata"]["uid"]  # resized in place
