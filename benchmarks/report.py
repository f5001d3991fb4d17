"""Merge the harness's JSON files into one results JSON + a markdown table (printed last).

    python -m benchmarks.report --engine q4.json [--engine-f16 f16.json] [--grpc grpc.json] \
        [--hf hf.json] [--out-dir benchmarks/results]
Writes <out-dir>/gpu_<card>_<date>.{json,md} (cpu_... for the cpu backend). Missing inputs or
sections show as "—" with the reason (error, skipped, timed out) listed under the tables; speed
never fails anything.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import git_commit, utc_now
from benchmarks.report_tables import detail_tables, dig, headline_rows, notes, render_headline

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def load_json(path: Path | None) -> dict[str, Any]:
    """{} for no path; {"missing": why} when the file is absent or unreadable (a killed run)."""
    if path is None:
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        return {"missing": f"{path}: {type(exc).__name__}: {exc}"}


def card_name(inputs: dict[str, dict[str, Any]]) -> str:
    for source, keys in (("engine", ("sections", "load", "result", "device_name")),
                         ("grpc", ("sections", "model_info", "result", "device_name")),
                         ("hf", ("sections", "load", "result", "device_name"))):
        name = dig(inputs.get(source), *keys)
        if name:
            return str(name)
    return "unknown"


def backend_name(inputs: dict[str, dict[str, Any]]) -> str:
    return str(dig(inputs.get("engine"), "sections", "load", "result", "backend")
               or dig(inputs.get("grpc"), "sections", "model_info", "result", "backend") or "gpu")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def build_report(inputs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """(merged JSON, markdown)."""
    card = card_name(inputs)
    date = utc_now()
    commit = str(dig(inputs.get("engine"), "commit") or git_commit())
    rows = headline_rows(inputs)
    merged = {"card": card, "date": date, "commit": commit, "backend": backend_name(inputs),
              "headline": rows, "inputs": inputs}
    model = dig(inputs.get("engine"), "model") or dig(inputs.get("grpc"), "serve_model") or "?"
    versions = dig(inputs.get("hf"), "versions") or {}
    lines = [f"# qwen-serve benchmark: {card}", "",
             f"- date {date}, commit {commit}, backend {merged['backend']}, model `{model}`",
             (f"- HF baseline: torch {versions.get('torch', '?')}, "
              f"transformers {versions.get('transformers', '?')}, same GGUF, same card, same run"), "",
             render_headline(rows), "", *detail_tables(inputs), "", *notes(inputs)]
    return merged, "\n".join(lines).rstrip() + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="report", description=__doc__.splitlines()[0])
    p.add_argument("--engine", type=Path, help="engine_bench JSON of the default (quantized) model")
    p.add_argument("--engine-f16", type=Path, help="engine_bench JSON of its F16 conversion")
    p.add_argument("--grpc", type=Path, help="grpc_load JSON")
    p.add_argument("--hf", type=Path, help="hf_baseline JSON")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="", help="file stem (default gpu_<card>_<date>)")
    p.add_argument("--also-to", type=Path, help="write the same two files here too (e.g. the device's $OUT)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources = (("engine", args.engine), ("engine_f16", args.engine_f16), ("grpc", args.grpc), ("hf", args.hf))
    inputs = {name: load_json(path) for name, path in sources}
    merged, markdown = build_report(inputs)
    prefix = "gpu" if merged["backend"] == "cuda" else merged["backend"]
    stem = args.name or f"{prefix}_{slug(merged['card'])}_{merged['date'][:10]}"
    for out_dir in [args.out_dir] + ([args.also_to] if args.also_to else []):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.json").write_text(json.dumps(merged, indent=2, default=str))
        (out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"written: {args.out_dir / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
