"""server/metrics.py: values recorded through the API come back from a real HTTP scrape."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import KNOWN_OUTCOMES, TTFT_BUCKETS_S, Metrics


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        body = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def served_metrics():
    metrics = Metrics()
    port = metrics.start(0)
    assert port is not None and port > 0
    yield metrics, port
    metrics.stop()


def test_scrape_returns_recorded_values(served_metrics):
    metrics, port = served_metrics
    metrics.add_tokens(prompt=12, generated=5)
    metrics.add_tokens(prompt=3, generated=0)
    metrics.request_finished("eos")
    metrics.request_finished("eos")
    metrics.request_finished("length")
    metrics.set_queue_depth(4)
    metrics.set_running(7)
    metrics.set_kv_blocks(used=30, free=90)
    metrics.worker_restarted()

    samples = scrape(port)
    assert samples[("qwen_serve:prompt_tokens_total", ())] == 15
    assert samples[("qwen_serve:generation_tokens_total", ())] == 5
    assert samples[("qwen_serve:requests_total", (("outcome", "eos"),))] == 2
    assert samples[("qwen_serve:requests_total", (("outcome", "length"),))] == 1
    assert samples[("qwen_serve:num_requests_waiting", ())] == 4
    assert samples[("qwen_serve:num_requests_running", ())] == 7
    assert samples[("qwen_serve:kv_blocks_used", ())] == 30
    assert samples[("qwen_serve:kv_blocks_free", ())] == 90
    assert samples[("qwen_serve:kv_cache_usage_ratio", ())] == pytest.approx(0.25)
    assert samples[("qwen_serve:worker_restarts_total", ())] == 1


def test_every_known_outcome_is_exported_from_the_first_scrape(served_metrics):
    _, port = served_metrics
    samples = scrape(port)
    for outcome in KNOWN_OUTCOMES:
        assert samples[("qwen_serve:requests_total", (("outcome", outcome),))] == 0


def test_histograms_bucket_observations(served_metrics):
    metrics, port = served_metrics
    for seconds in (0.003, 0.3, 30.0):
        metrics.observe_ttft(seconds)
    metrics.observe_itl(0.012)
    samples = scrape(port)
    ttft = "qwen_serve:time_to_first_token_seconds"
    assert samples[(ttft + "_count", ())] == 3
    assert samples[(ttft + "_sum", ())] == pytest.approx(30.303)
    assert samples[(ttft + "_bucket", (("le", "0.005"),))] == 1
    assert samples[(ttft + "_bucket", (("le", "0.5"),))] == 2
    assert samples[(ttft + "_bucket", (("le", "40.0"),))] == 3
    assert samples[(ttft + "_bucket", (("le", "+Inf"),))] == 3
    assert len([key for key in samples if key[0] == ttft + "_bucket"]) == len(TTFT_BUCKETS_S) + 1
    itl = "qwen_serve:inter_token_latency_seconds"
    assert samples[(itl + "_count", ())] == 1
    assert samples[(itl + "_bucket", (("le", "0.01"),))] == 0
    assert samples[(itl + "_bucket", (("le", "0.02"),))] == 1


def test_itl_of_tokens_that_arrived_together_counts_each_gap():
    """observe_itl(s, n) records exactly what n calls of observe_itl(s) record (count, sum, buckets)."""
    together, alone = Metrics(), Metrics()
    for seconds, count in ((0.004, 3), (0.2, 2), (9.0, 2), (0.0, 1)):
        together.observe_itl(seconds, count)
        for _ in range(count):
            alone.observe_itl(seconds)
    together.observe_itl(0.5, 0)
    itl = b"qwen_serve:inter_token_latency_seconds"
    lines = [[line for line in m.render().splitlines() if line.startswith(itl) and b"_created" not in line]
             for m in (together, alone)]
    assert lines[0] == lines[1] and itl + b"_count 8.0" in lines[0]


def test_instances_are_independent():
    first, second = Metrics(), Metrics()
    first.add_tokens(prompt=1, generated=2)
    assert b"qwen_serve:generation_tokens_total 2.0" in first.render()
    assert b"qwen_serve:generation_tokens_total 0.0" in second.render()


def test_start_none_records_without_serving():
    metrics = Metrics()
    assert metrics.start(None) is None
    assert metrics.port is None
    metrics.request_finished("stop")
    assert b'qwen_serve:requests_total{outcome="stop"} 1.0' in metrics.render()
    metrics.stop()  # idempotent when never started


def test_stop_closes_the_port():
    metrics = Metrics()
    port = metrics.start(0)
    metrics.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.request_finished("Bad Outcome"),
        lambda m: m.request_finished(""),
        lambda m: m.add_tokens(prompt=-1, generated=0),
        lambda m: m.add_tokens(prompt=0, generated=-2),
        lambda m: m.observe_ttft(-0.1),
        lambda m: m.observe_itl(-1.0),
        lambda m: m.observe_itl(0.1, -1),
        lambda m: m.set_queue_depth(-1),
        lambda m: m.set_running(-3),
        lambda m: m.set_kv_blocks(used=-1, free=2),
        lambda m: m.start(70000),
    ],
)
def test_invalid_values_raise_value_error(call):
    with pytest.raises(ValueError):
        call(Metrics())


def test_start_twice_is_refused(served_metrics):
    metrics, _ = served_metrics
    with pytest.raises(ValueError, match="already started"):
        metrics.start(0)
