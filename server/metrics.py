"""Prometheus metrics of the front-end, served on their own HTTP port.

Names follow the field's `<product>:<metric>` style (`vllm:`, `llamacpp:`), so a dashboard built for one
server maps onto this one. Each `Metrics` owns its own `CollectorRegistry`: several servers (and tests) can
live in one process without "Duplicated timeseries" errors from the global registry.

    metrics = Metrics()
    metrics.start(9090)              # None = record only, no HTTP endpoint; 0 = any free port
    metrics.add_tokens(prompt=12, generated=1)
    metrics.request_finished("eos")
"""

from __future__ import annotations

import re
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

PREFIX = "qwen_serve:"

# Outcomes the front-end reports; pre-created so that every series exists (at 0) from the first scrape,
# which keeps `rate()` and alerting rules well defined. Other lowercase names are accepted as well.
KNOWN_OUTCOMES = (
    "stop",  # stop string or stop token id
    "length",  # max_tokens or context reached
    "eos",  # end-of-sequence token
    "cancelled",  # client cancel, disconnect or Abort
    "deadline_exceeded",
    "invalid_argument",
    "resource_exhausted",  # admission queue full
    "unavailable",  # worker down
    "error",  # anything else
)

# Label values must stay a small closed set (each one is a time series): short lowercase identifiers only.
_OUTCOME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# Seconds. TTFT spans milliseconds (GPU, short prompt) to a minute (numpy backend, long prompt).
TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# Seconds between consecutive generated tokens of one request.
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


def _require_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _observe_many(histogram: Histogram, value: float, count: int) -> None:
    """`count` equal observations at the cost of one: under load the front-end gets tokens in batches,
    and observing each one alone was a visible share of its time. Relies on prometheus_client's
    Histogram layout (_sum, _buckets, _upper_bounds: stable since 0.4); falls back to a loop."""
    buckets, bounds, total = (getattr(histogram, name, None) for name in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is None or bounds is None or total is None:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    for bucket, bound in zip(buckets, bounds):
        if value <= bound:
            bucket.inc(count)
            break


class Metrics:
    """All front-end metrics, in one registry; thread-safe (prometheus-client locks each sample)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._http_server: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self._create_request_metrics()
        self._create_engine_metrics()

    def _create_request_metrics(self) -> None:
        registry = self.registry
        self._requests = Counter(
            PREFIX + "requests",
            "Finished generate requests by outcome (finish reason or gRPC status).",
            ["outcome"],
            registry=registry,
        )
        for outcome in KNOWN_OUTCOMES:
            self._requests.labels(outcome=outcome)
        self._prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.", registry=registry
        )
        self._generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens streamed to clients.", registry=registry
        )
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Request arrival to first generated token.",
            buckets=TTFT_BUCKETS_S,
            registry=registry,
        )
        self._itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            buckets=ITL_BUCKETS_S,
            registry=registry,
        )

    def _create_engine_metrics(self) -> None:
        registry = self.registry
        self._waiting = Gauge(
            PREFIX + "num_requests_waiting", "Requests queued for admission.", registry=registry
        )
        self._running = Gauge(
            PREFIX + "num_requests_running", "Requests in the running batch.", registry=registry
        )
        self._kv_used = Gauge(PREFIX + "kv_blocks_used", "KV-cache blocks in use.", registry=registry)
        self._kv_free = Gauge(PREFIX + "kv_blocks_free", "KV-cache blocks free.", registry=registry)
        self._kv_usage = Gauge(
            PREFIX + "kv_cache_usage_ratio", "Used / total KV-cache blocks (0..1).", registry=registry
        )
        self._worker_restarts = Counter(
            PREFIX + "worker_restarts", "Times the front-end restarted a dead worker.", registry=registry
        )

    # -- HTTP endpoint ---------------------------------------------------------------------------------
    def start(self, port: int | None, host: str = "127.0.0.1") -> int | None:
        """Serve /metrics on host:port in a daemon thread; returns the bound port (None: not served)."""
        if port is None:
            return None
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be in [0, 65535] (0 = any free port), got {port}")
        if self._http_server is not None:
            raise ValueError("metrics endpoint already started")
        self._http_server, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self.port

    @property
    def port(self) -> int | None:
        return None if self._http_server is None else int(self._http_server.server_port)

    def stop(self) -> None:
        """Stop the HTTP endpoint (idempotent); recorded values are kept."""
        if self._http_server is None:
            return
        self._http_server.shutdown()
        self._http_server.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
        self._http_server = None
        self._http_thread = None

    def render(self) -> bytes:
        """The text exposition format, as a scrape would return it."""
        return generate_latest(self.registry)

    # -- recording -------------------------------------------------------------------------------------
    def request_finished(self, outcome: str) -> None:
        if not _OUTCOME_PATTERN.match(outcome):
            raise ValueError(f"outcome must be a lowercase identifier of <= 32 chars, got {outcome!r}")
        self._requests.labels(outcome=outcome).inc()

    def add_tokens(self, prompt: int, generated: int) -> None:
        _require_non_negative("prompt", prompt)
        _require_non_negative("generated", generated)
        self._prompt_tokens.inc(prompt)
        self._generation_tokens.inc(generated)

    def observe_ttft(self, seconds: float) -> None:
        _require_non_negative("ttft seconds", seconds)
        self._ttft.observe(seconds)

    def observe_itl(self, seconds: float, count: int = 1) -> None:
        """`count` gaps of `seconds` each (tokens that reached the front-end together)."""
        _require_non_negative("itl seconds", seconds)
        _require_non_negative("itl count", count)
        if count == 1:
            self._itl.observe(seconds)
        elif count:
            _observe_many(self._itl, seconds, count)

    def set_queue_depth(self, n: int) -> None:
        _require_non_negative("queue depth", n)
        self._waiting.set(n)

    def set_running(self, n: int) -> None:
        _require_non_negative("running", n)
        self._running.set(n)

    def set_kv_blocks(self, used: int, free: int) -> None:
        _require_non_negative("kv blocks used", used)
        _require_non_negative("kv blocks free", free)
        self._kv_used.set(used)
        self._kv_free.set(free)
        total = used + free
        self._kv_usage.set(used / total if total else 0.0)

    def worker_restarted(self) -> None:
        self._worker_restarts.inc()
