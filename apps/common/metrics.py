"""A few Prometheus metrics and the /metrics, /healthz, /readyz endpoints.

Four metric families do not justify a dependency; the text exposition format is small
and stable (version 0.0.4).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

_Labels = tuple[tuple[str, str], ...]
_M = TypeVar("_M", "Counter", "Gauge", "Histogram")


def _fmt_labels(labels: _Labels, extra: str = "") -> str:
    items = [f'{k}="{v}"' for k, v in labels]
    if extra:
        items.append(extra)
    return "{" + ",".join(items) + "}" if items else ""


class Counter:
    def __init__(self, name: str, help_: str) -> None:
        self.name, self.help = name, help_
        self._values: dict[_Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for labels, value in sorted(self._values.items()):
                yield f"{self.name}{_fmt_labels(labels)} {value}"


class Gauge:
    """A gauge whose values are computed at scrape time."""

    def __init__(self, name: str, help_: str, collect: Callable[[], dict[_Labels, float]]) -> None:
        self.name, self.help, self._collect = name, help_, collect

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in sorted(self._collect().items()):
            yield f"{self.name}{_fmt_labels(labels)} {value}"


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_, buckets
        self._data: dict[_Labels, tuple[list[int], float, int]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, total, n = self._data.get(key, ([0] * len(self.buckets), 0.0, 0))
            counts = [
                c + (1 if value <= b else 0) for c, b in zip(counts, self.buckets, strict=True)
            ]
            self._data[key] = (counts, total + value, n + 1)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for labels, (counts, total, n) in sorted(self._data.items()):
                for bound, count in zip(self.buckets, counts, strict=True):
                    le = 'le="' + str(bound) + '"'
                    yield f"{self.name}_bucket{_fmt_labels(labels, le)} {count}"
                inf = 'le="+Inf"'
                yield f"{self.name}_bucket{_fmt_labels(labels, inf)} {n}"
                yield f"{self.name}_sum{_fmt_labels(labels)} {total}"
                yield f"{self.name}_count{_fmt_labels(labels)} {n}"


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric: _M) -> _M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


def serve(
    registry: Registry,
    port: int,
    ready: Callable[[], bool],
    host: str = "127.0.0.1",
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz in a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, code = registry.render().encode(), 200
            elif self.path == "/healthz":
                body, code = b"ok\n", 200
            elif self.path == "/readyz":
                ok = ready()
                body, code = (b"ok\n", 200) if ok else (b"not ready\n", 503)
            else:
                body, code = b"not found\n", 404
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
