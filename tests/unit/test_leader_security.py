"""A leader whose lease request hangs must stop leading (issue 17, item 7).

A loopback stand-in for the API server's Lease endpoint answers the first create and then
never answers again. Before, the elector sat in that request for the client's 30 s read
timeout while ``on_stopped_leading`` (where the controller exits) never ran, so two
replicas acted at once. Now every lease request times out inside the renew deadline and a
watchdog ends leadership at the deadline itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes.client as k8s
import pytest

from adapters.k8s.leader import LeaderElector

HANG_S = 60.0  # bounded: the test releases it at the end


class _LeaseApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.release = threading.Event()
        self.hung = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _LeaseApi

    def log_message(self, *_args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _hang_once_leading(self) -> bool:
        if self.server.lease is None:
            return False
        self.server.hung.set()
        self.server.release.wait(HANG_S)
        return True

    def do_GET(self) -> None:
        if not self._hang_once_leading():
            self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        lease = json.loads(self.rfile.read(length))
        lease["metadata"]["resourceVersion"] = "1"
        self.server.lease = lease
        self._send(201, lease)

    do_PUT = do_GET


@pytest.fixture
def api() -> Iterator[_LeaseApi]:
    server = _LeaseApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_a_leader_whose_lease_request_hangs_stops_leading(api: _LeaseApi) -> None:
    config = k8s.Configuration()
    config.host = f"http://127.0.0.1:{api.server_address[1]}"
    started, stopped = threading.Event(), threading.Event()
    elector = LeaderElector(
        k8s.ApiClient(config),
        "default",
        "chscale-controller",
        "replica-a",
        lease_duration=3.0,
        renew_deadline=2.0,
        retry_period=0.3,
        on_started_leading=started.set,
        on_stopped_leading=stopped.set,
        release_on_stop=False,
    )
    thread = threading.Thread(target=elector.run, daemon=True)
    thread.start()
    try:
        assert started.wait(20), "never led"
        assert api.hung.wait(20), "the renewal never reached the stand-in"
        # Well before the client's 30 s read timeout; the lease would be taken over
        # after 3 s, so a replica that still acted by then would be a second leader.
        assert stopped.wait(15), "kept leading while its lease request hung"
        assert not elector.is_leader()
    finally:
        elector.stop()
        api.release.set()
        thread.join(10)
