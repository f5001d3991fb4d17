"""Shared pieces of the benchmark harness: time-bounded sections, result files, percentiles.

Benchmarks, not tests: nothing here judges speed. A section that fails or runs out of its time
budget records why and the run goes on, so one broken measurement never loses the others.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_int_list(text: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32]; ValueError for empty or non-positive entries."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) <= 0:
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def git_commit() -> str:
    """HEAD's short hash; GIT_COMMIT wins (the GPU machine gets a copy of the tree without .git)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() or "unknown"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def percentiles_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """p50/p99/mean in milliseconds of durations given in seconds (None when there are none)."""
    values = np.asarray(list(values_s), np.float64)
    if values.size == 0:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "count": 0}
    return {"p50_ms": float(np.percentile(values, 50) * 1e3),
            "p99_ms": float(np.percentile(values, 99) * 1e3),
            "mean_ms": float(values.mean() * 1e3), "count": int(values.size)}


class Budget:
    """A section's wall-clock allowance; measurements ask `exceeded()` before starting another."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"a time budget must be > 0 s, got {seconds}")
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def exceeded(self) -> bool:
        return time.monotonic() >= self.deadline

    def skip_note(self) -> dict[str, str]:
        return {"skipped": f"section time budget of {self.seconds:g} s exceeded"}


class ResultFile:
    """A JSON result written again after every section, so a run killed by `timeout` keeps what
    it had measured."""

    def __init__(self, path: Path | None, header: dict[str, Any]) -> None:
        self.path = path
        # QWEN_SERVE_* settings (e.g. QWEN_SERVE_CUDA_FUSED) change what is measured: recorded.
        settings = {k: v for k, v in os.environ.items() if k.startswith("QWEN_SERVE_") and "TOKEN" not in k}
        self.data: dict[str, Any] = {"date": utc_now(), "commit": git_commit(), **header,
                                     "qwen_serve_env": settings, "sections": {}}
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False, default=str))
            tmp.replace(self.path)

    def run_section(self, name: str, budget_s: float, measure: Callable[[Budget], Any]) -> Any:
        """Run `measure(budget)`; record its result, or the error, under sections[name]."""
        started = time.monotonic()
        print(f"--- {name} (budget {budget_s:g} s)", flush=True)
        # Overwritten below; stays if the process is killed (outer `timeout`) inside this section.
        unfinished = {"error": "started but never finished (killed by a timeout?)"}
        self.data["sections"][name] = {"result": unfinished}
        self.save()
        try:
            result = measure(Budget(budget_s))
        except Exception as exc:  # noqa: BLE001 -- one failed section must not lose the others
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
            print(f"    {name} FAILED: {result['error']}", flush=True)
        self.data["sections"][name] = {"elapsed_s": round(time.monotonic() - started, 3), "result": result}
        self.save()
        print(f"    {name}: {json.dumps(result, default=str)[:400]}", flush=True)
        return result
