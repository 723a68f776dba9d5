"""What ``kubectl get`` prints, asked of the API server itself: it renders a resource's
printer columns as a meta.k8s.io Table when the client asks for one."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client as k8s

TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def server_table(api_client: k8s.ApiClient, path: str) -> tuple[list[str], list[list[Any]]]:
    """The column names and each row's cells of the Table for ``path`` (an object or a
    collection)."""
    response = api_client.call_api(
        "GET", f"{api_client.configuration.host}{path}", header_params={"Accept": TABLE}
    )
    response.read()
    table = json.loads(response.data)
    return [c["name"] for c in table["columnDefinitions"]], [r["cells"] for r in table["rows"]]
