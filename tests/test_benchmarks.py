"""The benchmark harness (issue 5) in --quick mode on the cpu backend and the tiny model, so it
cannot rot before its one run on a GPU. These check that every path runs and that its numbers
are consistent (token counts, byte accounting, report rows); they never judge speed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import engine_bench, grpc_load, hf_baseline, report, report_tables
from benchmarks.common import Budget, parse_int_list
from gpu_worker.model.gguf_loader import load_gguf

REPO = Path(__file__).resolve().parents[1]


def sections(path: Path) -> dict:
    return {name: entry["result"] for name, entry in json.loads(path.read_text())["sections"].items()}


@pytest.fixture(scope="module")
def engine_json(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "engine.json"
    assert engine_bench.main([str(tiny_model_path), "--backend", "cpu", "--quick", "--json", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def grpc_json(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "grpc.json"
    rc = grpc_load.main(["--serve-model", str(tiny_model_path), "--backend", "cpu", "--quick",
                         "--waves", "2", "--json", str(out)])
    assert rc == 0, json.loads(out.read_text()).get("server_error")
    return out


def test_engine_bench_measures_every_section(engine_json: Path, tiny_model_path: Path) -> None:
    result = sections(engine_json)
    config = load_gguf(tiny_model_path).config
    load = result["load"]
    assert load["backend"] == "cpu" and load["load_s"] > 0
    assert load["kv_bytes_per_token"] == config.kv_bytes_per_token
    assert load["weight_bytes"] > 0
    assert set(result["decode"]) == {"1", "2"}
    for batch, measured in result["decode"].items():
        assert measured["batch"] == int(batch) and measured["tok_s"] > 0 and measured["timed_steps"] == 3
    assert set(result["prefill"]) == {"8", "32"}
    assert all(p["latency_ms"] > 0 and p["engine_steps"] == 1 for p in result["prefill"].values())
    aggregate = result["aggregate"]
    assert aggregate["num_seqs"] == 4 and aggregate["new_tokens"] == 4 and aggregate["output_tok_s"] > 0


def test_engine_bench_isolates_failures_and_budget(tiny_model_path: Path, tmp_path: Path) -> None:
    """A prompt longer than the context fails the decode sizes (recorded, one per size), prefill
    sizes beyond the context are skipped with a note, and the aggregate section still runs."""
    out = tmp_path / "engine.json"
    argv = [str(tiny_model_path), "--backend", "cpu", "--quick", "--json", str(out)]
    assert engine_bench.main(argv + ["--prompt-len", "4096", "--prefill", "32,4096"]) == 0
    result = sections(out)
    assert all("error" in r and "refused" in r["error"] for r in result["decode"].values())
    assert "skipped" in result["prefill"]["4096"] and result["prefill"]["32"]["latency_ms"] > 0
    assert result["aggregate"]["output_tok_s"] > 0
    with pytest.raises(ValueError):
        Budget(0)


def test_engine_bench_budget_exhausted_skips_with_notes(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    assert engine_bench.main([str(tiny_model_path), "--backend", "cpu", "--quick", "--budget-s", "1e-9",
                              "--json", str(out)]) == 0
    result = sections(out)
    assert result["load"]["weight_bytes"] > 0       # load is needed by everything: never skipped
    skipped = [*result["decode"].values(), *result["prefill"].values(), result["aggregate"]]
    assert len(skipped) == 5 and all("budget" in r["skipped"] for r in skipped)
    merged, markdown = report.build_report({"engine": json.loads(out.read_text())})
    assert markdown.count("time budget") == 5 and merged["headline"][0]["meets"] == "—"


def test_engine_bench_decode_is_steady_when_prefill_takes_many_steps(tiny_model_path: Path,
                                                                     tmp_path: Path) -> None:
    """A token budget of one prompt per step staggers the prefill: the first sequences decode while
    the last ones prefill, and must still be running through every timed step."""
    out = tmp_path / "engine.json"
    assert engine_bench.main([str(tiny_model_path), "--backend", "cpu", "--quick", "--batches", "1,6",
                              "--max-tokens-per-step", "16", "--skip", "prefill,aggregate",
                              "--json", str(out)]) == 0
    decode = sections(out)["decode"]
    assert decode["6"]["timed_steps"] == 3 and decode["6"]["tok_s"] > 0, decode
    assert sections(out)["load"]["max_tokens_per_step"] == 16


def test_engine_bench_quick_overrides_sizes_and_rejects_bad_flags(tiny_model_path: Path) -> None:
    args = engine_bench.parse_args([str(tiny_model_path), "--quick"])
    assert args.batch_list == [1, 2] and args.prefill_list == [8, 32]
    with pytest.raises(SystemExit):
        engine_bench.parse_args([str(tiny_model_path), "--skip", "nonsense"])
    with pytest.raises(ValueError):
        parse_int_list("1,0")


def test_grpc_load_against_a_started_server(grpc_json: Path) -> None:
    data = json.loads(grpc_json.read_text())
    result = sections(grpc_json)
    assert result["model_info"]["backend"] == "cpu" and data["server_start_s"] > 0
    for level in (1, 3):
        measured = result[f"concurrency_{level}"]
        assert measured["requests"] == level and measured["ok"] == level and measured["errors"] == 0
        assert measured["output_tokens"] == 4 * level
        assert measured["ttft"]["count"] == level and measured["ttft"]["p50_ms"] > 0
        assert measured["itl"]["count"] == 3 * level
        assert measured["aggregate_tok_s"] > 0
        assert measured["waves"] == 2 and len(measured["wave_aggregate_tok_s"]) == 2
        assert measured["aggregate_tok_s"] == measured["wave_aggregate_tok_s"][measured["median_wave"]]


def test_grpc_summary_arithmetic() -> None:
    """Deltas of several tokens count as that many gaps; short or failed streams are errors."""
    good = {"sent": 0.0, "ended": 1.0, "token_times": [0.1, 0.3, 0.7], "token_counts": [1, 2, 1],
            "finish_reason": "FINISH_REASON_LENGTH", "completion_tokens": 4, "error": ""}
    short = {**good, "token_times": [0.2], "token_counts": [1], "finish_reason": "FINISH_REASON_EOS"}
    failed = {**good, "token_times": [], "token_counts": [], "finish_reason": "", "error": "UNAVAILABLE: x"}
    summary = grpc_load.summarize([good, short, failed], expected_tokens=4)
    assert summary["ok"] == 1 and summary["errors"] == 2 and len(summary["error_kinds"]) == 2
    assert summary["output_tokens"] == 5 and summary["itl"]["count"] == 3
    assert summary["itl"]["p50_ms"] == pytest.approx(100.0)          # gaps 0.1, 0.1, 0.4 s
    assert summary["ttft"]["count"] == 2 and summary["aggregate_tok_s"] == pytest.approx(5.0)
    assert summary["stream_decode_tok_s_median"] == pytest.approx(3 / 0.6)


def test_the_median_wave_is_reported_with_every_waves_aggregate() -> None:
    waves = [{"aggregate_tok_s": rate, "wave": i} for i, rate in enumerate((41.0, 28.0, 43.0, 40.0, 42.0))]
    level = grpc_load.median_wave(waves)
    assert level["aggregate_tok_s"] == 41.0 and level["median_wave"] == level["wave"] == 0
    assert level["waves"] == 5
    assert level["wave_aggregate_tok_s"] == [41.0, 28.0, 43.0, 40.0, 42.0]
    assert grpc_load.median_wave(waves[:4])["aggregate_tok_s"] == 40.0      # the lower middle of 4
    assert grpc_load.median_wave(waves[:1])["median_wave"] == 0
    assert report_tables.wave_note(level) == " (median of 5 waves, 28–43)"
    assert report_tables.wave_note(grpc_load.median_wave(waves[:1])) == ""


def test_report_merges_runs_into_the_issue_table(engine_json: Path, grpc_json: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "results"
    assert report.main(["--engine", str(engine_json), "--grpc", str(grpc_json),
                        "--hf", str(tmp_path / "absent.json"), "--out-dir", str(out_dir),
                        "--name", "run"]) == 0
    markdown = (out_dir / "run.md").read_text()
    merged = json.loads((out_dir / "run.json").read_text())
    assert merged["card"].startswith("numpy") and merged["backend"] == "cpu" and merged["commit"]
    decode1 = sections(engine_json)["decode"]["1"]["tok_s"]
    assert merged["headline"][0]["value"] == decode1
    for text in ("≥ 2,500 tok/s", "≤ 5 ms", "≤ 1.5 s", "12 KiB fp16", f"{decode1:,.0f} tok/s",
                 "| 3 |", "hf: missing", "median of 2 waves"):
        assert text in markdown, text
    assert capsys.readouterr().out.rstrip().endswith(".md")


def test_hf_baseline_arguments_and_skip_without_torch(tiny_model_path: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    args = hf_baseline.parse_args([str(tiny_model_path), "--quick", "--sections", "eager"])
    assert args.batch_list == [1, 2] and args.section_list == ["eager"] and args.new_tokens == 4
    with pytest.raises(SystemExit):
        hf_baseline.parse_args([str(tiny_model_path), "--sections", "eager,warp"])
    monkeypatch.setitem(sys.modules, "torch", None)      # import torch -> ImportError
    out = tmp_path / "hf.json"
    assert hf_baseline.main([str(tiny_model_path), "--json", str(out)]) == 0
    assert "torch" in json.loads(out.read_text())["skipped"]


@pytest.mark.slow
def test_hf_baseline_runs_on_cpu(tiny_model_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    assert hf_baseline.main([str(tiny_model_path), "--device", "cpu", "--dtype", "float32", "--quick",
                             "--compile-backend", "eager", "--json", str(out)]) == 0
    result = sections(out)
    assert result["load"]["device_name"] == "cpu"
    assert result["compile"]["dynamo_graphs_compiled"] > 0
    for mode, batches in (("eager", ("1", "2")), ("compile", ("1",))):
        for batch in batches:
            assert result[mode][batch]["total_tok_s"] > 0 and result[mode][batch]["new_tokens"] == 4


def test_run_all_quick_on_cpu(tiny_model_path: Path, tmp_path: Path) -> None:
    """The one command the GPU run uses, end to end on the cpu backend (HF skipped: tested above)."""
    env = {**os.environ, "QUICK": "1", "BACKEND": "cpu", "SKIP_HF": "1", "PY": sys.executable,
           "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
           "F16_MODEL": str(tmp_path / "tiny_f16.gguf")}
    run = subprocess.run(["bash", "benchmarks/run_all.sh", str(tiny_model_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(written) == 2 and written[0].startswith("cpu_numpy") and written[0].endswith(".json")
    merged = json.loads((tmp_path / "results" / written[0]).read_text())
    assert sections_of(merged, "engine_f16", "load")["quant_types"].get("F16", 0) > 0
    assert (tmp_path / "tiny_f16.gguf").is_file() and (tmp_path / "out" / "results" / written[0]).is_file()
    assert "!!!" not in run.stdout, run.stdout[-3000:]
    assert run.stdout.rstrip().endswith(".md")


def sections_of(merged: dict, source: str, name: str) -> dict:
    return merged["inputs"][source]["sections"][name]["result"]


def test_grpc_load_stops_its_server_when_terminated(tiny_model_path: Path, tmp_path: Path) -> None:
    """run_all.sh runs grpc_load under `timeout`: its SIGTERM must take the started server (own
    session, would hold the GPU) down with it."""
    out = tmp_path / "grpc.json"
    command = [sys.executable, "-m", "benchmarks.grpc_load", "--serve-model", str(tiny_model_path),
               "--backend", "cpu", "--concurrency", "1", "--max-tokens", "1000", "--rounds", "100",
               "--json", str(out)]
    load = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "concurrency_1" not in started_sections(out):
            assert time.monotonic() < deadline and load.poll() is None, "load generator did not get going"
            time.sleep(0.1)
        server_pid = json.loads(out.read_text())["server_pid"]
        load.send_signal(signal.SIGTERM)
        assert load.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if load.poll() is None:          # SIGTERM first: it stops the server this run started
            load.terminate()
            try:
                load.wait(timeout=30)
            except subprocess.TimeoutExpired:
                load.kill()
    assert not process_running(server_pid)
    assert "never finished" in sections(out)["concurrency_1"]["error"]


def process_running(pid: int) -> bool:
    """False for a pid that is gone or a zombie (exited; the container's init may not reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def started_sections(path: Path) -> dict:
    """Sections of a result file being written (a section is listed as soon as it starts)."""
    return json.loads(path.read_text())["sections"] if path.exists() else {}


def test_decode_host_path_runs_the_overlapped_decode_with_the_cuda_host_work(capsys) -> None:
    """benchmarks.decode_host_path: the engine's steps submitted ahead, over the CUDA backend's
    host work (check_step_batch, StepInputs.upload, pack_sampling) on the CPU; every timed step
    after the first of each repeat goes ahead."""
    from benchmarks import decode_host_path

    assert decode_host_path.main(["--batch", "8", "--steps", "6", "--repeats", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith("decode batch 8: host ") and " ms per step " in line
    ahead = int(line.split("; ")[-1].split()[0])   # "...; N steps submitted ahead)"
    assert ahead >= 2 * 6
