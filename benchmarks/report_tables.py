"""The markdown of the benchmark report: issue 5's headline table (value, target, HF ratio) and
the detail tables. Inputs are the harness JSONs keyed engine / engine_f16 / grpc / hf."""
from __future__ import annotations

from typing import Any

TARGET_WEIGHT_BYTES = 500e6
TARGET_KV_BYTES_PER_TOKEN = 12 * 1024


def dig(data: Any, *keys: str) -> Any:
    """data[k1][k2]... or None where any level is missing."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def section(inputs: dict[str, Any], source: str, name: str) -> Any:
    return dig(inputs.get(source), "sections", name, "result")


def fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:,.{digits}f}{unit}"


def wave_note(result: Any) -> str:
    """' (median of 5 waves, 33,100-36,000)' for a gRPC level run several times, else ''."""
    rates = dig(result, "wave_aggregate_tok_s")
    if not isinstance(rates, list) or len(rates) < 2:
        return ""
    return f" (median of {len(rates)} waves, {fmt(min(rates))}–{fmt(max(rates))})"


def ratio(ours: Any, theirs: Any, higher_is_better: bool = True) -> str:
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)) or not ours or not theirs:
        return "—"
    return f"×{(ours / theirs if higher_is_better else theirs / ours):.1f}"


def row(measure: str, value: Any, shown: str, target: str, meets: bool | None, hf: str = "—",
        vs_hf: str = "—") -> dict[str, Any]:
    verdict = "—" if meets is None or value is None else ("yes" if meets else "no")
    return {"measure": measure, "value": value, "shown": shown, "target": target, "meets": verdict,
            "hf": hf, "vs_hf": vs_hf}


def headline_rows(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per line of the issue's target table (values from the quantized default model)."""
    load = section(inputs, "engine", "load") or {}
    decode1 = dig(section(inputs, "engine", "decode"), "1", "tok_s")
    stream1 = dig(section(inputs, "grpc", "concurrency_1"), "stream_decode_tok_s_median")
    stream1_all = dig(section(inputs, "grpc", "concurrency_1"), "aggregate_tok_s")   # includes TTFT
    grpc256 = dig(section(inputs, "grpc", "concurrency_256"), "aggregate_tok_s")
    engine_agg = dig(section(inputs, "engine", "aggregate"), "output_tok_s")
    prefill512 = dig(section(inputs, "engine", "prefill"), "512", "latency_ms")
    hf_eager1 = dig(section(inputs, "hf", "eager"), "1", "decode_tok_s")
    hf_comp1 = dig(section(inputs, "hf", "compile"), "1", "decode_tok_s")
    hf_256 = dig(section(inputs, "hf", "eager"), "256", "total_tok_s")
    hf_b1 = f"eager {fmt(hf_eager1)} / compiled {fmt(hf_comp1)} tok/s"
    hf_load_s = dig(section(inputs, "hf", "load"), "load_s")
    weight, kv_token = load.get("weight_bytes"), load.get("kv_bytes_per_token")

    def b1_ratio(v: Any) -> str:
        return f"{ratio(v, hf_eager1)} / {ratio(v, hf_comp1)}"

    def at_least(v: Any, t: float) -> bool | None:
        return None if not isinstance(v, (int, float)) else v >= t

    def at_most(v: Any, t: float) -> bool | None:
        return None if not isinstance(v, (int, float)) else v <= t

    return [
        row("decode batch 1, engine", decode1, fmt(decode1, " tok/s"), "≥ 2,500 tok/s",
            at_least(decode1, 2500), hf_b1, b1_ratio(decode1)),
        row("single stream through gRPC (client-observed decode)", stream1,
            f"{fmt(stream1, ' tok/s')} (with TTFT: {fmt(stream1_all, ' tok/s')})",
            "≥ 2,000 tok/s", at_least(stream1, 2000), hf_b1, b1_ratio(stream1)),
        row("aggregate, 256 concurrent gRPC streams (128 + 128)", grpc256,
            fmt(grpc256, " tok/s") + wave_note(section(inputs, "grpc", "concurrency_256")),
            "≥ 40,000 tok/s", at_least(grpc256, 40000), f"batch 256 eager {fmt(hf_256)} tok/s",
            ratio(grpc256, hf_256)),
        row("aggregate, 256 sequences, engine (128 + 128)", engine_agg, fmt(engine_agg, " tok/s"),
            "≥ 40,000 tok/s", at_least(engine_agg, 40000), f"batch 256 eager {fmt(hf_256)} tok/s",
            ratio(engine_agg, hf_256)),
        row("prefill of 512 tokens, engine", prefill512, fmt(prefill512, " ms", 2), "≤ 5 ms",
            at_most(prefill512, 5.0)),
        row("model load (file → weights on the device)", load.get("load_s"),
            fmt(load.get("load_s"), " s", 2), "≤ 1.5 s", at_most(load.get("load_s"), 1.5),
            f"HF load {fmt(hf_load_s, ' s', 1)}"),
        row("VRAM for weights", weight, fmt(weight and weight / 1e6, " MB", 1), "≤ 500 MB",
            at_most(weight, TARGET_WEIGHT_BYTES)),
        row("KV cache per token", kv_token, fmt(kv_token and kv_token / 1024, " KiB", 2), "12 KiB fp16",
            at_most(kv_token, TARGET_KV_BYTES_PER_TOKEN)),
    ]


def render_headline(rows: list[dict[str, Any]]) -> str:
    lines = ["| measure | ours | target | meets | HF transformers (same run) | ours vs HF |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['measure']} | {r['shown']} | {r['target']} | {r['meets']} | {r['hf']} | {r['vs_hf']} |"
              for r in rows]
    return "\n".join(lines)


def detail_tables(inputs: dict[str, Any]) -> list[str]:
    lines = ["## Engine (no gRPC)", "", "| measure | default model | F16 conversion |", "|---|---|---|"]
    measures = (("load_s", "load (weights on device)", " s", 2),
                ("load_plus_kv_graphs_warmup_s", "load + KV + graphs + warm-up", " s", 2),
                ("weight_bytes", "weight bytes", "", 0),
                ("kv_bytes_per_1k_tokens", "KV bytes per 1k tokens", "", 0))
    for key, label, unit, digits in measures:
        values = [dig(section(inputs, src, "load"), key) for src in ("engine", "engine_f16")]
        lines.append(f"| {label} | " + " | ".join(fmt(v, unit, digits) for v in values) + " |")
    batches = _keys(inputs, "decode")
    for batch in batches:
        values = [dig(section(inputs, src, "decode"), batch) or {} for src in ("engine", "engine_f16")]
        cells = [f"{fmt(v.get('tok_s'), ' tok/s')} ({fmt(v.get('ms_per_step'), ' ms/step', 2)})"
                 for v in values]
        lines.append(f"| decode batch {batch} | " + " | ".join(cells) + " |")
    for batch in _keys(inputs, "step_parts"):
        values = [dig(section(inputs, src, "step_parts"), batch) or {} for src in ("engine", "engine_f16")]
        cells = [f"graph replay {fmt(v.get('graph_forward_ms'), ' ms', 3)}, "
                 f"greedy sampler {fmt(v.get('sample_greedy_model_ms'), ' ms', 3)}" for v in values]
        lines.append(f"| decode batch {batch}: GPU parts of a step | " + " | ".join(cells) + " |")
    for length in _keys(inputs, "prefill"):
        values = [dig(section(inputs, src, "prefill"), length) or {} for src in ("engine", "engine_f16")]
        cells = [f"{fmt(v.get('latency_ms'), ' ms', 2)} ({fmt(v.get('tok_s'), ' tok/s')})" for v in values]
        lines.append(f"| prefill {length} tokens | " + " | ".join(cells) + " |")
    agg = [section(inputs, src, "aggregate") or {} for src in ("engine", "engine_f16")]
    cells = [fmt(a.get("output_tok_s"), " tok/s") for a in agg]
    lines.append("| aggregate output tok/s (256 x 128 + 128) | " + " | ".join(cells) + " |")
    return lines + ["", *grpc_table(inputs), "", *hf_table(inputs)]


def _keys(inputs: dict[str, Any], name: str) -> list[str]:
    keys: list[str] = []
    for src in ("engine", "engine_f16"):
        for key in section(inputs, src, name) or {}:
            if key.isdigit() and key not in keys:
                keys.append(key)
    return sorted(keys, key=int)


def grpc_table(inputs: dict[str, Any]) -> list[str]:
    lines = ["## End to end through gRPC (client-observed)", "",
             ("| streams | TTFT p50 / p99 | inter-token p50 / p99 | aggregate output | per-stream decode "
              "| errors |"),
             "|---|---|---|---|---|---|"]
    sections = dig(inputs.get("grpc"), "sections") or {}
    for name, entry in sections.items():
        result = entry.get("result") or {}
        if not name.startswith("concurrency_") or "ttft" not in result:
            continue
        ttft, itl = result["ttft"], result["itl"]
        lines.append(f"| {name.split('_')[1]} "
                     f"| {fmt(ttft['p50_ms'], ' ms', 1)} / {fmt(ttft['p99_ms'], ' ms', 1)} "
                     f"| {fmt(itl['p50_ms'], ' ms', 2)} / {fmt(itl['p99_ms'], ' ms', 2)} "
                     f"| {fmt(result['aggregate_tok_s'], ' tok/s')}{wave_note(result)} "
                     f"| {fmt(result['stream_decode_tok_s_median'], ' tok/s')} "
                     f"| {result['errors']} of {result['requests']} |")
    return lines


def hf_table(inputs: dict[str, Any]) -> list[str]:
    dtype = dig(section(inputs, "hf", "load"), "dtype") or "?"
    lines = [f"## HF transformers baseline (same GGUF, {dtype})", "",
             "| mode | batch | decode tok/s | whole generate() tok/s |", "|---|---|---|---|"]
    for mode in ("eager", "compile"):
        for batch, result in (section(inputs, "hf", mode) or {}).items():
            if isinstance(result, dict) and "batch" in result:
                lines.append(f"| {mode} | {batch} | {fmt(result['decode_tok_s'])} "
                             f"| {fmt(result['total_tok_s'])} |")
    compiled = section(inputs, "hf", "compile") or {}
    if "how" in compiled:
        lines += ["", (f"compile: {compiled['how']}; graphs compiled by dynamo: "
                       f"{compiled.get('dynamo_graphs_compiled')} (0 = the static cache ran uncompiled)")]
    return lines


def notes(inputs: dict[str, Any]) -> list[str]:
    """Every missing input, failed or skipped section or size, so no gap goes unexplained."""
    found: list[str] = []
    for source, data in inputs.items():
        if not data:
            continue
        for key in ("missing", "skipped", "server_error"):
            if data.get(key):
                found.append(f"- {source}: {key}: {str(data[key])[:300]}")
        for name, entry in (data.get("sections") or {}).items():
            found += _result_notes(f"{source}/{name}", entry.get("result"))
    return ["## Notes", "", *found] if found else []


def _result_notes(where: str, result: Any) -> list[str]:
    if not isinstance(result, dict):
        return []
    if "error" in result or "skipped" in result:
        return [f"- {where}: {str(result.get('error') or result.get('skipped'))[:300]}"]
    if result.get("error_kinds"):    # gRPC streams that failed or came back short
        return [f"- {where}: {count} x {why[:200]}" for why, count in result["error_kinds"].items()]
    return [line for key, value in result.items() if isinstance(value, dict)
            for line in _result_notes(f"{where}/{key}", value) if "error" in value or "skipped" in value]
