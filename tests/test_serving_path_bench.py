"""benchmarks.serving_path runs end to end in quick mode (measures nothing; keeps the harness working):
the free-forward worker serves through a real `qwen-serve serve --attach`, and `serve` itself never
offers that backend."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import serving_path
from server.cli import build_parser


def test_serving_path_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "serving_path.json"
    assert serving_path.main(["--concurrency", "1,2", "--json", str(out), "--", "--quick"]) == 0
    data = json.loads(out.read_text())
    assert data["sections"]["model_info"]["result"]["backend"] == "free-forward (benchmark)"
    for level in (1, 2):
        measured = data["sections"][f"concurrency_{level}"]["result"]
        assert measured["ok"] == level and measured["errors"] == 0 and measured["output_tokens"] == 4 * level
        assert measured["tokens_per_delta"] >= 1
        assert data["serving_path"]["engine_alone"][f"concurrency_{level}"]["output_tokens"] == 4 * level


def test_serve_cannot_pick_the_benchmark_backend() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]    # type: ignore[union-attr]
    backend = next(action for action in serve._actions if action.dest == "backend")
    assert set(backend.choices) == {"auto", "cpu", "cuda"}
