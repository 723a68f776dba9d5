"""Forged /mutate-pod reviews (issue 17, item 3): the webhook reads with its own, broad
credentials, so what it looks up and what it answers must follow from the review's own
object only. A lookup is made in the review's namespace for the pod's owner (name and
uid of its ownerReference), and a VM that does not exist answers exactly as one of
another uid does: no existence oracle, no sizes of someone else's VM."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.webhook.admission import mutate_pod_review
from core.constants import API_GROUP, API_VERSION, KIND, VM_CONTAINER, VM_NAME_LABEL

VICTIM_UID = "0b7d3d6e-victim"


def victim_vm() -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": "secret-vm", "namespace": "victim", "uid": VICTIM_UID},
        "spec": {
            "instance": {"cpu": {"sockets": 2, "coresPerSocket": 4}, "memory": {"size": "8Gi"}}
        },
    }


class Recorder:
    def __init__(self, objects: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.objects, self.calls = objects, []  # type: ignore[var-annotated]

    def __call__(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append((namespace, name))
        return self.objects.get((namespace, name))


def forged(
    name: str, *, namespace: str | None, meta_namespace: str | None, owner_uid: str | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "probe", "labels": {VM_NAME_LABEL: name}}
    if meta_namespace:
        meta["namespace"] = meta_namespace
    if owner_uid is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": name,
                "uid": owner_uid,
                "controller": True,
            }
        ]
    request: dict[str, Any] = {
        "uid": "review",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "operation": "CREATE",
        "object": {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"containers": [{"name": VM_CONTAINER, "image": "x"}]},
        },
    }
    if namespace is not None:
        request["namespace"] = namespace
    return request


def answer(review: dict[str, Any]) -> dict[str, Any]:
    return review["response"]


def test_the_namespace_comes_from_the_review_never_from_the_object() -> None:
    lookups = Recorder({("victim", "secret-vm"): victim_vm()})
    review = forged("secret-vm", namespace=None, meta_namespace="victim", owner_uid="guess")
    out = answer(mutate_pod_review(review, lookups))
    assert out["allowed"] is False
    assert ("victim", "secret-vm") not in lookups.calls


def test_a_pod_without_an_owner_uid_causes_no_lookup() -> None:
    lookups = Recorder({("victim", "secret-vm"): victim_vm()})
    review = forged("secret-vm", namespace="victim", meta_namespace="victim", owner_uid=None)
    out = answer(mutate_pod_review(review, lookups))
    assert out["allowed"] is False
    assert lookups.calls == []


@pytest.mark.parametrize("owner_uid", ["guess", None])
def test_an_existing_foreign_vm_answers_as_a_missing_one(owner_uid: str | None) -> None:
    present = Recorder({("victim", "secret-vm"): victim_vm()})
    absent = Recorder({})
    review = forged("secret-vm", namespace="victim", meta_namespace="victim", owner_uid=owner_uid)
    seen, unseen = (
        answer(mutate_pod_review(review, present)),
        answer(mutate_pod_review(review, absent)),
    )
    assert seen == unseen
    assert seen["allowed"] is False
    assert "8Gi" not in str(seen) and "patch" not in seen


def test_the_owner_with_its_uid_is_sized() -> None:
    lookups = Recorder({("victim", "secret-vm"): victim_vm()})
    review = forged("secret-vm", namespace="victim", meta_namespace="victim", owner_uid=VICTIM_UID)
    out = answer(mutate_pod_review(review, lookups))
    assert out["allowed"] is True and "patch" in out
    assert lookups.calls == [("victim", "secret-vm")]
