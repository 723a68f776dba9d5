"""The admission rules as pure functions (no TLS, no API server): every rule of RESIZE.md
§5, the JSONPatch each mutation sends, the pod mutation, the registration payload."""

from __future__ import annotations

import base64
import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.webhook.admission import (
    BadReview,
    LookupFailed,
    mutate_pod_review,
    mutate_vm_review,
    parse_review,
    patched,
    pointer,
    validate_vm_review,
)
from apps.webhook.main import ServiceRef, webhook_configurations
from core.config import KernelConfig
from core.constants import API_GROUP, API_VERSION, VM_CONTAINER, VM_NAME_LABEL, VM_UID_LABEL, MiB

ROOT = Path(__file__).resolve().parents[2]

# --- a small RFC 6902 applier, to check that patches do what they say -----------------


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """Apply add/replace/remove/test ops to ``doc`` in place; raise on an op that does
    not apply (a missing parent, an index out of range)."""
    for op in ops:
        tokens = [_unescape(t) for t in op["path"].split("/")[1:]]
        parent = doc
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                if not 0 <= index <= len(parent):
                    raise IndexError(op["path"])
                parent.insert(index, op["value"])
            elif kind == "replace":
                parent[index] = op["value"]
            elif kind == "remove":
                del parent[index]
            elif kind == "test":
                assert parent[index] == op["value"]
        elif isinstance(parent, dict):
            if kind == "add":
                parent[last] = op["value"]
            elif kind == "replace":
                if last not in parent:
                    raise KeyError(op["path"])
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                assert parent[last] == op["value"]
        else:
            raise TypeError(f"{op['path']}: parent is {type(parent).__name__}")
    return doc


def test_apply_patch_refuses_what_a_server_would_refuse():
    with pytest.raises(KeyError):
        apply_patch({"a": {}}, [{"op": "add", "path": "/b/c", "value": 1}])
    with pytest.raises(IndexError):
        apply_patch({"a": []}, [{"op": "add", "path": "/a/3", "value": 1}])
    assert apply_patch({"a/b": {"~": 1}}, [{"op": "add", "path": "/a~1b/~0", "value": 2}]) == {
        "a/b": {"~": 2}
    }


# --- builders -------------------------------------------------------------------------

UID = "review-1"


def vm(
    sockets: Any = 2,
    cores: Any = 4,
    size: Any = "4Gi",
    *,
    max_vcpus: Any = None,
    max_size: Any = None,
    phase: str | None = None,
    capacity: dict[str, Any] | None = None,
    resources: Any = None,
    run_policy: str | None = "Once",
) -> dict[str, Any]:
    cpu: dict[str, Any] = {}
    if sockets is not None:
        cpu["sockets"] = sockets
    if cores is not None:
        cpu["coresPerSocket"] = cores
    if max_vcpus is not None:
        cpu["maxVcpus"] = max_vcpus
    memory: dict[str, Any] = {"size": size}
    if max_size is not None:
        memory["maxSize"] = max_size
    obj: dict[str, Any] = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": "my-vm", "namespace": "ns", "uid": "vm-uid"},
        "spec": {"instance": {"cpu": cpu, "memory": memory}},
    }
    if resources is not None:
        obj["spec"]["resources"] = resources
    if run_policy is not None:
        obj["spec"]["runPolicy"] = run_policy
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    if capacity is not None:
        status["capacity"] = capacity
    if status:
        obj["status"] = status
    return obj


RUNNING = {
    "phase": "Running",
    "capacity": {"maxVcpus": 16, "maxMemory": "20Gi", "bootMemory": "4Gi"},
}


def request(obj: Any, operation: str = "CREATE", old: Any = None, **extra: Any) -> dict:
    req: dict[str, Any] = {
        "uid": UID,
        "kind": {"group": API_GROUP, "version": API_VERSION, "kind": "VirtualMachine"},
        "operation": operation,
        "namespace": "ns",
        "name": "my-vm",
        "object": obj,
        **extra,
    }
    if old is not None:
        req["oldObject"] = old
    return req


def ops_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    answer = response["response"]
    assert answer["uid"] == UID and answer["allowed"] is True
    if "patch" not in answer:
        return []
    assert answer["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(answer["patch"]))


def refusal(response: dict[str, Any]) -> dict[str, Any]:
    answer = response["response"]
    assert answer["uid"] == UID and answer["allowed"] is False, answer
    assert "patch" not in answer
    return answer["status"]


def both(cpu: str, memory: str) -> dict[str, dict[str, str]]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}


# --- the envelope ---------------------------------------------------------------------


def review_bytes(req: Any, **envelope: Any) -> bytes:
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}
    body.update(envelope)
    return json.dumps(body).encode()


def test_parse_review_returns_the_request():
    req = request(vm())
    assert parse_review(review_bytes(req)) == req


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "empty body"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (review_bytes(request(vm()), apiVersion="admission.k8s.io/v1beta1"), "apiVersion"),
        (review_bytes(request(vm()), kind="Pod"), "kind"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request"),
        (review_bytes([1]), "request is missing or not an object"),
        (review_bytes({"operation": "CREATE"}), "request.uid"),
        (review_bytes({"uid": 7}), "request.uid"),
        (review_bytes({"uid": ""}), "request.uid"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"request": {"uid": ' + b"9" * 5000 + b"}}", "not JSON"),
    ],
)
def test_parse_review_says_what_is_wrong(body: bytes, says: str):
    with pytest.raises(BadReview, match=says):
        parse_review(body)


def test_json_pointer_escapes_tilde_and_slash():
    assert pointer("metadata", "labels", VM_NAME_LABEL) == (
        "/metadata/labels/cloudhypervisor.quill.today~1vm"
    )
    assert pointer("a~b", "~1", "/") == "/a~0b/~01/~1"
    assert pointer("spec", "containers", 3, "resizePolicy", "-") == (
        "/spec/containers/3/resizePolicy/-"
    )
    doc = {"metadata": {"labels": {VM_NAME_LABEL: "a"}}}
    apply_patch(
        doc, [{"op": "add", "path": pointer("metadata", "labels", VM_NAME_LABEL), "value": "b"}]
    )
    assert doc["metadata"]["labels"][VM_NAME_LABEL] == "b"


def test_no_ops_means_no_patch_at_all():
    assert patched(UID, []) == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": UID, "allowed": True},
    }


# --- mutate VM ------------------------------------------------------------------------


def test_seed_yaml_gets_resources_from_the_instance_spec():
    obj = vm()  # the seed's example: 2 sockets x 4 cores, 4Gi
    ops = ops_of(mutate_vm_review(request(obj)))
    assert ops == [{"op": "add", "path": "/spec/resources", "value": both("8", "4352Mi")}]
    mutated = apply_patch(copy.deepcopy(obj), ops)
    assert mutated["spec"]["resources"] == both("8", "4352Mi")  # 4Gi + 256Mi overhead
    assert mutated["spec"]["instance"] == obj["spec"]["instance"]


def test_cpu_topology_defaults_to_one_socket_one_core():
    ops = ops_of(mutate_vm_review(request(vm(sockets=None, cores=None))))
    assert ops == [
        {"op": "add", "path": "/spec/instance/cpu/sockets", "value": 1},
        {"op": "add", "path": "/spec/instance/cpu/coresPerSocket", "value": 1},
        {"op": "add", "path": "/spec/resources", "value": both("1", "4352Mi")},
    ]
    no_cpu = vm()
    del no_cpu["spec"]["instance"]["cpu"]
    ops = ops_of(mutate_vm_review(request(no_cpu)))
    assert ops[0] == {
        "op": "add",
        "path": "/spec/instance/cpu",
        "value": {"sockets": 1, "coresPerSocket": 1},
    }
    assert apply_patch(no_cpu, ops)["spec"]["resources"] == both("1", "4352Mi")


def test_explicit_null_counts_as_absent():
    obj = vm(cores=None)
    obj["spec"]["instance"]["cpu"]["coresPerSocket"] = None
    ops = ops_of(mutate_vm_review(request(obj)))
    assert ops[0] == {"op": "add", "path": "/spec/instance/cpu/coresPerSocket", "value": 1}
    assert apply_patch(obj, ops)["spec"]["instance"]["cpu"]["coresPerSocket"] == 1


def test_consistent_resources_need_no_patch_whatever_their_spelling():
    assert ops_of(mutate_vm_review(request(vm(resources=both("8", "4352Mi"))))) == []
    assert ops_of(mutate_vm_review(request(vm(resources=both("8000m", "4.25Gi"))))) == []
    assert ops_of(mutate_vm_review(request(vm(resources=both(8, 4352 * MiB))))) == []


def test_update_keeps_resources_consistent_with_the_new_instance_spec():
    old = vm(resources=both("8", "4352Mi"))
    new = vm(sockets=3, size="8Gi", resources=both("8", "4352Mi"))
    ops = ops_of(mutate_vm_review(request(new, "UPDATE", old)))
    assert ops == [
        {"op": "add", "path": "/spec/resources/requests/cpu", "value": "12"},
        {"op": "add", "path": "/spec/resources/requests/memory", "value": "8448Mi"},
        {"op": "add", "path": "/spec/resources/limits/cpu", "value": "12"},
        {"op": "add", "path": "/spec/resources/limits/memory", "value": "8448Mi"},
    ]
    assert apply_patch(new, ops)["spec"]["resources"] == both("12", "8448Mi")


def test_a_user_value_below_the_formula_is_corrected_and_other_names_kept():
    resources = {
        "requests": {"cpu": "1", "memory": "1Gi", "hugepages-2Mi": "1Gi"},
        "limits": "lots",
    }
    obj = vm(resources=resources)
    mutated = apply_patch(obj, ops_of(mutate_vm_review(request(obj))))
    assert mutated["spec"]["resources"] == {
        "requests": {"cpu": "8", "memory": "4352Mi", "hugepages-2Mi": "1Gi"},
        "limits": {"cpu": "8", "memory": "4352Mi"},
    }


def test_resources_that_are_not_an_object_are_replaced_whole():
    obj = vm(resources=["cpu", 8])
    ops = ops_of(mutate_vm_review(request(obj)))
    assert ops == [{"op": "add", "path": "/spec/resources", "value": both("8", "4352Mi")}]


def test_the_memory_overhead_is_the_configured_one():
    config = KernelConfig(pod_memory_overhead=512 * MiB)
    ops = ops_of(mutate_vm_review(request(vm()), config))
    assert ops[0]["value"] == both("8", "4608Mi")


@pytest.mark.parametrize(
    "obj",
    [
        vm(size="lots"),  # cannot be parsed
        vm(sockets="two"),
        vm(sockets=0),  # parses, but the rules refuse it
        vm(size="3Mi"),
        {"metadata": {"name": "my-vm"}},  # no spec
        {"metadata": {"name": "my-vm"}, "spec": "big"},
        {"spec": {"instance": {"memory": {"size": "1Gi"}}}},  # no name at all
        ["not", "an", "object"],
    ],
)
def test_a_spec_the_validator_refuses_is_not_patched(obj: Any):
    assert ops_of(mutate_vm_review(request(obj))) == []


def test_generate_name_objects_are_defaulted_before_they_have_a_name():
    obj = vm()
    obj["metadata"] = {"generateName": "vm-", "namespace": "ns"}
    ops = ops_of(mutate_vm_review(request(obj, name="")))
    assert ops[0]["value"] == both("8", "4352Mi")


def test_delete_and_connect_are_not_mutated():
    for operation in ("DELETE", "CONNECT"):
        assert ops_of(mutate_vm_review(request(vm(sockets=None), operation))) == []


# --- validate VM ----------------------------------------------------------------------


def assert_refused(response: dict[str, Any], field: str, words: str) -> None:
    status = refusal(response)
    assert (status["code"], status["reason"], status["status"]) == (422, "Invalid", "Failure")
    causes = status["details"]["causes"]
    assert field in [c["field"] for c in causes], causes
    assert field in status["message"] and words in status["message"], status["message"]
    assert 'VirtualMachine "ns/my-vm" is invalid' in status["message"]


def no_memory_size() -> dict[str, Any]:
    obj = vm()
    del obj["spec"]["instance"]["memory"]["size"]
    return obj


def running(obj: dict[str, Any], phase: str = "Running") -> dict[str, Any]:
    obj["status"] = {**copy.deepcopy(RUNNING), "phase": phase}
    return obj


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        (vm(sockets=0), "spec.instance.cpu.sockets", "at least 1"),
        (vm(sockets=-3), "spec.instance.cpu.sockets", "at least 1"),
        (vm(cores=0), "spec.instance.cpu.coresPerSocket", "at least 1"),
        (vm(max_vcpus=4), "spec.instance.cpu", "exceeds maxVcpus 4"),
        (vm(size="0"), "spec.instance.memory.size", "positive"),
        (vm(size="-1Gi"), "spec.instance.memory.size", "positive"),
        (vm(size="3Mi"), "spec.instance.memory.size", "multiple of 2Mi"),
        (vm(size=1_000_001), "spec.instance.memory.size", "multiple of 2Mi"),
        (vm(max_size="3Gi"), "spec.instance.memory.maxSize", "below memory.size"),
        (vm(sockets="two"), "spec.instance.cpu.sockets", "integer"),
        (vm(size="lots"), "spec.instance.memory.size", "not a quantity"),
        ({"metadata": {"name": "my-vm", "namespace": "ns"}, "spec": 5}, "spec", "object"),
    ],
)
def test_create_is_refused_with_the_field_path(obj: Any, field: str, words: str):
    assert_refused(validate_vm_review(request(obj)), field, words)


def test_an_object_without_a_name_or_not_an_object_is_refused():
    nameless = vm()
    nameless["metadata"] = {"namespace": "ns"}
    status = refusal(validate_vm_review(request(nameless, name="")))
    assert status["details"]["causes"][0]["field"] == "metadata.name"
    status = refusal(validate_vm_review(request([1, 2])))
    assert status["code"] == 422 and status["details"]["causes"][0]["field"] == "object"


def test_a_valid_create_is_admitted():
    assert refusal_or_none(validate_vm_review(request(vm()))) is None
    big = vm(sockets=4, cores=4, size="16Gi", max_vcpus=32, max_size="64Gi")
    assert refusal_or_none(validate_vm_review(request(big))) is None


def refusal_or_none(response: dict[str, Any]) -> dict[str, Any] | None:
    answer = response["response"]
    assert answer["uid"] == UID
    return None if answer["allowed"] else answer["status"]


@pytest.mark.parametrize(
    ("new", "field", "words"),
    [
        (vm(sockets=4, cores=5), "spec.instance.cpu", "ceiling of 16"),  # 20 > capacity 16
        (vm(size="2Gi"), "spec.instance.memory.size", "below the boot size 4Gi"),
        (vm(size="22Gi"), "spec.instance.memory.size", "ceiling of 20Gi"),
        (vm(max_vcpus=24), "spec.instance.cpu.maxVcpus", "cannot change while the VMM runs"),
        (vm(max_size="30Gi"), "spec.instance.memory.maxSize", "cannot change"),
        (vm(sockets=0), "spec.instance.cpu.sockets", "at least 1"),
        (vm(size="3Mi"), "spec.instance.memory.size", "multiple of 2Mi"),
    ],
)
@pytest.mark.parametrize("phase", ["Running", "Paused", "PodResizeInProgress"])
def test_update_of_a_running_vm_is_refused_beyond_what_its_vmm_can_do(
    new: dict[str, Any], field: str, words: str, phase: str
):
    old = running(vm(), phase)
    assert_refused(validate_vm_review(request(running(new, phase), "UPDATE", old)), field, words)


def test_resizes_within_capacity_are_admitted_while_running():
    old = running(vm())
    for new in (
        vm(sockets=4, cores=4, size="20Gi"),  # up to both ceilings
        vm(sockets=1, cores=1, size="4Gi"),  # down to the boot size
        vm(sockets=2, cores=6, size="6Gi"),
    ):
        assert refusal_or_none(validate_vm_review(request(running(new), "UPDATE", old))) is None


def test_ceilings_may_change_while_no_vmm_runs():
    for phase in ("Pending", "Succeeded", "Failed"):
        old = vm()
        old["status"] = {**RUNNING, "phase": phase}
        new = vm(sockets=4, cores=8, max_vcpus=64, max_size="64Gi")
        assert refusal_or_none(validate_vm_review(request(new, "UPDATE", old))) is None


def test_update_that_leaves_the_instance_alone_is_admitted_even_if_invalid():
    """A finalizer removed from a VM created before the webhook existed must not be
    blocked by its old, invalid spec (it would never be deleted)."""
    legacy = running(vm(sockets=0, size="3Mi"))
    legacy["metadata"]["finalizers"] = [f"{API_GROUP}/vm-protection"]
    without = copy.deepcopy(legacy)
    without["metadata"]["finalizers"] = []
    assert refusal_or_none(validate_vm_review(request(without, "UPDATE", legacy))) is None
    # ...but any change to the instance is judged in full.
    changed = copy.deepcopy(without)
    changed["spec"]["instance"]["cpu"]["coresPerSocket"] = 5
    assert_refused(
        validate_vm_review(request(changed, "UPDATE", legacy)), "spec.instance.cpu.sockets", "1"
    )


def test_delete_is_not_validated():
    assert refusal_or_none(validate_vm_review(request(vm(sockets=0), "DELETE"))) is None


def test_an_unparseable_old_object_counts_as_no_old_object():
    new = vm(sockets=4, cores=8)  # within the spec rules, 32 vCPUs
    assert refusal_or_none(validate_vm_review(request(new, "UPDATE", ["junk"]))) is None
    assert refusal_or_none(validate_vm_review(request(new, "UPDATE", {"spec": {}}))) is None


def test_huge_values_are_refused_with_a_bounded_message():
    obj = vm(size="x" * 60, sockets=[["y" * 10_000]])
    status = refusal(validate_vm_review(request(obj)))
    assert len(status["message"]) <= 2048
    assert {c["field"] for c in status["details"]["causes"]} >= {"spec.instance.cpu.sockets"}


# --- mutate pod -----------------------------------------------------------------------


def pod(
    resources: Any = None,
    resize_policy: Any = None,
    *,
    labels: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": VM_CONTAINER, "image": "ch"}
    if resources is not None:
        container["resources"] = resources
    if resize_policy is not None:
        container["resizePolicy"] = resize_policy
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "vm-my-vm",
            "labels": {VM_NAME_LABEL: "my-vm", VM_UID_LABEL: "vm-uid"}
            if labels is None
            else labels,
            # As the controller's pod carries it: the webhook looks the VM up by it only.
            "ownerReferences": [
                {"apiVersion": "cloudhypervisor.quill.today/v1beta1", "kind": "VirtualMachine",
                 "name": "my-vm", "uid": "vm-uid", "controller": True}
            ],
        },
        "spec": {"containers": containers if containers is not None else [container]},
    }


def pod_request(obj: Any, operation: str = "CREATE") -> dict[str, Any]:
    return {
        "uid": UID,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "operation": operation,
        "namespace": "ns",
        "object": obj,
    }


class Lookups:
    def __init__(self, objects: dict[tuple[str, str], Any] | None = None) -> None:
        self.objects = {("ns", "my-vm"): vm()} if objects is None else objects
        self.calls: list[tuple[str, str]] = []

    def __call__(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append((namespace, name))
        found = self.objects.get((namespace, name))
        if isinstance(found, Exception):
            raise found
        return found


NOT_REQUIRED = [
    {"resourceName": "cpu", "restartPolicy": "NotRequired"},
    {"resourceName": "memory", "restartPolicy": "NotRequired"},
]


def test_a_vm_pod_without_resources_gets_them_from_the_vm_and_not_required_policy():
    lookups = Lookups()
    obj = pod()
    ops = ops_of(mutate_pod_review(pod_request(obj), lookups))
    assert lookups.calls == [("ns", "my-vm")]
    assert ops == [
        {"op": "add", "path": "/spec/containers/0/resources", "value": both("8", "4352Mi")},
        {"op": "add", "path": "/spec/containers/0/resizePolicy", "value": NOT_REQUIRED},
    ]
    container = apply_patch(obj, ops)["spec"]["containers"][0]
    assert container["resources"] == both("8", "4352Mi")
    assert container["resizePolicy"] == NOT_REQUIRED


def test_a_pod_that_carries_requests_equal_limits_keeps_them_without_a_lookup():
    def no_lookup(namespace: str, name: str) -> None:
        raise AssertionError("no lookup needed")

    ops = ops_of(mutate_pod_review(pod_request(pod(both("2", "1Gi"))), no_lookup))
    assert ops == [{"op": "add", "path": "/spec/containers/0/resizePolicy", "value": NOT_REQUIRED}]
    done = pod(both("2000m", "1024Mi"), NOT_REQUIRED)
    assert ops_of(mutate_pod_review(pod_request(done), no_lookup)) == []


def test_restart_container_becomes_not_required_and_other_entries_stay():
    policy = [
        {"resourceName": "memory", "restartPolicy": "RestartContainer"},
        {"resourceName": "example.com/gpu", "restartPolicy": "RestartContainer"},
    ]
    obj = pod(both("2", "1Gi"), policy)
    ops = ops_of(mutate_pod_review(pod_request(obj), None))
    assert ops == [
        {
            "op": "add",
            "path": "/spec/containers/0/resizePolicy/0/restartPolicy",
            "value": "NotRequired",
        },
        {
            "op": "add",
            "path": "/spec/containers/0/resizePolicy/-",
            "value": {"resourceName": "cpu", "restartPolicy": "NotRequired"},
        },
    ]
    assert apply_patch(obj, ops)["spec"]["containers"][0]["resizePolicy"] == [
        {"resourceName": "memory", "restartPolicy": "NotRequired"},
        {"resourceName": "example.com/gpu", "restartPolicy": "RestartContainer"},
        {"resourceName": "cpu", "restartPolicy": "NotRequired"},
    ]


def test_requests_below_limits_are_fixed_from_the_vm_keeping_other_resources():
    resources = {
        "requests": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "1Gi"},
        "limits": {"cpu": "8", "memory": "4352Mi"},
    }
    obj = pod(resources, NOT_REQUIRED)
    mutated = apply_patch(obj, ops_of(mutate_pod_review(pod_request(obj), Lookups())))
    assert mutated["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "8", "memory": "4352Mi", "ephemeral-storage": "1Gi"},
        "limits": {"cpu": "8", "memory": "4352Mi"},
    }


def test_the_vm_manager_container_is_found_wherever_it_is():
    sidecar = {"name": "log-shipper", "image": "busybox"}
    obj = pod(containers=[sidecar, {"name": VM_CONTAINER, "image": "ch"}])
    ops = ops_of(mutate_pod_review(pod_request(obj), Lookups()))
    assert {op["path"] for op in ops} == {
        "/spec/containers/1/resources",
        "/spec/containers/1/resizePolicy",
    }
    assert apply_patch(obj, ops)["spec"]["containers"][0] == sidecar


def test_other_pods_pass_unchanged():
    lookups = Lookups()
    plain = pod(labels={"app": "web"})
    assert ops_of(mutate_pod_review(pod_request(plain), lookups)) == []
    assert lookups.calls == []
    assert ops_of(mutate_pod_review(pod_request(pod(), "UPDATE"), lookups)) == []
    assert ops_of(mutate_pod_review(pod_request("not a pod"), lookups)) == []


def test_a_vm_pod_without_vm_manager_passes_with_a_warning():
    obj = pod(containers=[{"name": "other", "image": "x"}])
    answer = mutate_pod_review(pod_request(obj), Lookups())["response"]
    assert answer["allowed"] is True and "patch" not in answer
    assert VM_CONTAINER in answer["warnings"][0]


@pytest.mark.parametrize(
    ("objects", "code", "words"),
    [
        ({}, 404, "VirtualMachine ns/my-vm (label cloudhypervisor.quill.today/vm) does not"),
        ({("ns", "my-vm"): LookupFailed("connection refused")}, 503, "connection refused"),
        ({("ns", "my-vm"): RuntimeError("boom")}, 503, "cannot read VirtualMachine ns/my-vm"),
        ({("ns", "my-vm"): vm(size="lots")}, 422, "spec.instance.memory.size"),
        (
            {("ns", "my-vm"): {**vm(), "metadata": {"name": "my-vm", "uid": "new-uid"}}},
            404,  # a VM of another uid gets the answer a missing one gets (ADR 0011)
            "VirtualMachine ns/my-vm (label cloudhypervisor.quill.today/vm) does not",
        ),
    ],
)
def test_a_vm_pod_whose_size_cannot_be_known_is_refused(
    objects: dict[tuple[str, str], Any], code: int, words: str
):
    status = refusal(mutate_pod_review(pod_request(pod()), Lookups(objects)))
    assert status["code"] == code and words in status["message"], status


def test_without_api_access_only_pods_that_need_a_lookup_are_refused():
    assert refusal(mutate_pod_review(pod_request(pod()), None))["code"] == 503
    assert ops_of(mutate_pod_review(pod_request(pod(both("1", "1Gi"))), None)) != []


# --- registration ---------------------------------------------------------------------

BUNDLE = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_local_registration_calls_the_url_with_the_ca_and_safe_settings():
    mutating, validating = webhook_configurations(BUNDLE, url_base="https://127.0.0.1:9443/")
    hooks = {h["name"]: h for h in mutating["webhooks"] + validating["webhooks"]}
    assert set(hooks) == {
        "vm-defaults.cloudhypervisor.quill.today",
        "vm-pod.cloudhypervisor.quill.today",
        "vm-validation.cloudhypervisor.quill.today",
    }
    routes = {name: h["clientConfig"]["url"] for name, h in hooks.items()}
    assert routes == {
        "vm-defaults.cloudhypervisor.quill.today": "https://127.0.0.1:9443/mutate-vm",
        "vm-pod.cloudhypervisor.quill.today": "https://127.0.0.1:9443/mutate-pod",
        "vm-validation.cloudhypervisor.quill.today": "https://127.0.0.1:9443/validate-vm",
    }
    for hook in hooks.values():
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == BUNDLE
        assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] == 5
        assert hook["admissionReviewVersions"] == ["v1"]
        assert "namespaceSelector" not in hook  # the VM rules apply to every VM
    vm_rule = hooks["vm-validation.cloudhypervisor.quill.today"]["rules"]
    assert vm_rule == hooks["vm-defaults.cloudhypervisor.quill.today"]["rules"]
    assert vm_rule[0]["resources"] == ["virtualmachines"]  # not virtualmachines/status
    assert vm_rule[0]["operations"] == ["CREATE", "UPDATE"]
    pod_hook = hooks["vm-pod.cloudhypervisor.quill.today"]
    assert pod_hook["rules"][0]["resources"] == ["pods"]
    assert pod_hook["rules"][0]["operations"] == ["CREATE"]
    assert pod_hook["objectSelector"] == {
        "matchExpressions": [{"key": VM_NAME_LABEL, "operator": "Exists"}]
    }


def test_a_namespace_selector_applies_to_every_hook():
    selector = {"matchLabels": {"team": "a"}}
    mutating, validating = webhook_configurations(
        "pem", url_base="https://x", namespace_selector=selector, name_prefix="t"
    )
    assert mutating["metadata"]["name"] == "t-mutating"
    assert validating["metadata"]["name"] == "t-validating"
    for hook in mutating["webhooks"] + validating["webhooks"]:
        assert hook["namespaceSelector"] == selector


def test_url_or_service_exactly_one():
    with pytest.raises(ValueError):
        webhook_configurations(BUNDLE)
    with pytest.raises(ValueError):
        webhook_configurations(BUNDLE, url_base="https://x", service=ServiceRef("a", "b"))


def _deployed(kind: str) -> dict[str, Any]:
    for path in sorted((ROOT / "deploy" / "webhook").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind:
                return doc
    raise AssertionError(f"no {kind} in deploy/webhook")


def test_the_deploy_manifests_register_the_same_hooks_through_the_service():
    service = _deployed("Service")
    meta, port = service["metadata"], service["spec"]["ports"][0]["port"]
    ref = ServiceRef(meta["name"], meta["namespace"], port)
    mutating, validating = webhook_configurations(None, service=ref)
    for generated in (mutating, validating):
        deployed = copy.deepcopy(_deployed(generated["kind"]))
        for hook in deployed["webhooks"]:
            # The placeholder that the CA injection replaces.
            assert "caBundle" in hook["clientConfig"]
            del hook["clientConfig"]["caBundle"]
        deployed["metadata"].pop("annotations", None)
        deployed["metadata"].pop("labels", None)
        assert deployed == generated


# --- values no rule expects -----------------------------------------------------------


def deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def test_a_value_too_deep_to_quote_is_refused_not_crashed():
    obj = vm(sockets=deep(sys.getrecursionlimit() + 50))
    status = refusal(validate_vm_review(request(obj)))
    assert status["code"] == 422 and "nested too deeply" in status["message"]
    assert ops_of(mutate_vm_review(request(obj))) == []
    # Equally deep, equal instances on both sides of an UPDATE: judged, not compared.
    old, new = vm(), vm()
    old["spec"]["instance"]["extra"] = deep(sys.getrecursionlimit() + 50)
    new["spec"]["instance"]["extra"] = deep(sys.getrecursionlimit() + 50)
    assert refusal_or_none(validate_vm_review(request(new, "UPDATE", old))) is None


def test_numbers_too_long_to_print_are_refused_not_crashed():
    huge = 10**4000  # sockets x cores has more digits than Python will print
    obj = vm(sockets=huge, cores=huge)
    old = running(vm())
    status = refusal(validate_vm_review(request(running(obj), "UPDATE", old)))
    assert status["code"] == 422 and "spec.instance" in status["message"]
    assert ops_of(mutate_vm_review(request(obj))) == []


@pytest.mark.parametrize("label", ["../../secrets/x", "My-VM", "", "a" * 300])
def test_a_label_that_cannot_name_a_vm_is_refused_before_any_lookup(label: str):
    lookups = Lookups()
    obj = pod(labels={VM_NAME_LABEL: label})
    answer = mutate_pod_review(pod_request(obj), lookups)["response"]
    if label:
        assert (
            answer["allowed"] is False
            and "cannot name a VirtualMachine" in (answer["status"]["message"])
        )
    else:  # an empty label value does not make a VM pod
        assert answer["allowed"] is True and "patch" not in answer
    assert lookups.calls == []


@pytest.mark.parametrize(
    "broken",
    [{"metadata": {"finalizers": 5}}, {"status": {"conditions": 5}}],
    ids=["finalizers-int", "conditions-int"],
)
def test_metadata_or_status_of_the_wrong_type_is_refused_not_crashed(broken: dict[str, Any]):
    obj = vm()
    for key, value in broken.items():
        obj[key] = {**obj.get(key, {}), **value}
    status = refusal(validate_vm_review(request(obj)))
    assert status["code"] == 422 and "malformed" in status["message"]
    assert ops_of(mutate_vm_review(request(obj))) == []


# --- ch-vmm's defaults, warnings and refusals (ADR 0013) --------------------------------


def test_a_missing_memory_size_is_defaulted_to_1gi_as_ch_vmm_does():
    obj = no_memory_size()
    ops = ops_of(mutate_vm_review(request(obj)))
    assert {"op": "add", "path": "/spec/instance/memory/size", "value": "1Gi"} in ops
    mutated = apply_patch(obj, ops)
    assert mutated["spec"]["resources"] == both("8", "1280Mi")  # 1Gi + 256Mi
    assert refusal_or_none(validate_vm_review(request(mutated))) is None

    no_memory = vm()
    del no_memory["spec"]["instance"]["memory"]
    mutated = apply_patch(no_memory, ops_of(mutate_vm_review(request(no_memory))))
    assert mutated["spec"]["instance"]["memory"] == {"size": "1Gi"}

    bare = {"metadata": {"name": "my-vm", "namespace": "ns"}, "spec": {}}
    mutated = apply_patch(bare, ops_of(mutate_vm_review(request(bare))))
    assert mutated["spec"]["instance"] == {
        "cpu": {"sockets": 1, "coresPerSocket": 1},
        "memory": {"size": "1Gi"},
    }
    assert mutated["spec"]["runPolicy"] == "Once"


def test_run_policy_is_defaulted_to_once_and_a_written_one_kept():
    ops = ops_of(mutate_vm_review(request(vm(run_policy=None))))
    assert ops[0] == {"op": "add", "path": "/spec/runPolicy", "value": "Once"}
    ops = ops_of(mutate_vm_review(request(vm(run_policy="Always"))))
    assert all(op["path"] != "/spec/runPolicy" for op in ops)


def warnings_of(response: dict[str, Any]) -> list[str]:
    answer = response["response"]
    assert answer["uid"] == UID and answer["allowed"] is True, answer
    return answer.get("warnings", [])


def test_fields_kept_but_not_used_are_admitted_with_a_warning_each():
    obj = vm(run_policy="RerunOnFailure")
    obj["spec"]["volumes"] = [{"name": "root", "containerDisk": {"image": "ubuntu"}}]
    obj["spec"]["instance"]["disks"] = [{"name": "root"}]
    obj["spec"]["livenessProbe"] = {"tcpSocket": {"port": 22}}
    warnings = warnings_of(validate_vm_review(request(obj)))
    assert [w.split(" ")[0] for w in warnings] == [
        "spec.instance.disks",
        "spec.volumes",
        "spec.livenessProbe",
        "spec.runPolicy",
    ]
    # An update that changes only the ignored fields still says so.
    changed = copy.deepcopy(obj)
    changed["spec"]["volumes"].append({"name": "data"})
    assert warnings_of(validate_vm_review(request(changed, "UPDATE", obj))) == warnings
    assert warnings_of(validate_vm_review(request(vm()))) == []


def test_dedicated_cpus_are_admitted_with_what_chscale_does_about_them():
    obj = vm()
    obj["spec"]["instance"]["cpu"]["dedicatedCPUPlacement"] = True
    (warning,) = warnings_of(validate_vm_review(request(obj)))
    assert warning.startswith("spec.instance.cpu.dedicatedCPUPlacement")
    assert "Infeasible" in warning
    mutated = apply_patch(obj, ops_of(mutate_vm_review(request(obj))))
    assert mutated["spec"]["resources"] == both("8", "4352Mi")


def test_hugepages_are_refused_with_the_field_and_the_reason():
    obj = vm()
    obj["spec"]["instance"]["memory"]["hugepages"] = {"pageSize": "1Gi"}
    assert_refused(
        validate_vm_review(request(obj)), "spec.instance.memory.hugepages", "hugepages-1Gi"
    )
    assert ops_of(mutate_vm_review(request(obj))) == []
    obj["spec"]["instance"]["memory"]["hugepages"] = {"pageSize": "3Mi"}
    assert_refused(
        validate_vm_review(request(obj)), "spec.instance.memory.hugepages.pageSize", "2Mi, 1Gi"
    )
