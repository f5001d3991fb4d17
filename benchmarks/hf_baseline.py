"""The side-by-side baseline: HF transformers + PyTorch generating from the SAME GGUF, same shapes.

    python -m benchmarks.hf_baseline MODEL.gguf --json out.json [--device cuda] [--sections eager,compile]

Loads with AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float16) (transformers
dequantizes the file), then greedy generate() with EOS suppressed (min_new_tokens) over random
`--prompt-len`-token prompts. Per batch size: total tok/s of a whole generate() call, and decode
tok/s = batch * (N - 1) / (t(N new tokens) - t(1 new token)), prefill excluded. Sections: `eager`
(dynamic cache), `compile` (static cache + torch.compile, as HF documents it; failure recorded).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Budget, ResultFile, parse_int_list

SECTIONS = ("eager", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hf_baseline", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="GGUF file")
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--batches", default="1,256", help="eager batch sizes")
    p.add_argument("--compile-batches", default="1", help="static cache + torch.compile batch sizes")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor: mode reduce-overhead)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--sections", default="eager,compile")
    p.add_argument("--budget-s", type=float, default=120.0, help="time budget per section (s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, measures nothing")
    if p.parse_known_args(argv)[0].quick:   # quick sizes replace the defaults; explicit flags still win
        p.set_defaults(batches="1,2", compile_batches="1", prompt_len=8, new_tokens=4)
    args = p.parse_args(argv)
    args.batch_list, args.compile_list = parse_int_list(args.batches), parse_int_list(args.compile_batches)
    args.section_list = [s for s in args.sections.split(",") if s]
    unknown = set(args.section_list) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.prompt_len <= 0 or args.new_tokens < 2:
        p.error("need --prompt-len > 0 and --new-tokens >= 2")
    return args


def torch_missing_reason() -> str | None:
    """None when torch and transformers import; else why the baseline cannot run."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"torch/transformers not importable: {exc}"
    return None


def load_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model.parent, gguf_file=args.model.name,
                                                 dtype=getattr(torch, args.dtype))
    return model.to(args.device).eval()


class Generator:
    """Timed greedy generate() calls on fixed random prompts # input_ids [batch, prompt_len]."""

    def __init__(self, model: Any, args: argparse.Namespace) -> None:
        self.model, self.args = model, args

    def prompts(self, batch: int) -> Any:
        import torch

        high = min(int(self.model.config.vocab_size), 30000)
        generator = torch.Generator().manual_seed(batch)
        return torch.randint(0, high, (batch, self.args.prompt_len), generator=generator).to(self.args.device)

    def timed(self, input_ids: Any, new_tokens: int) -> float:
        import torch

        self._sync()
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=0)
        self._sync()
        elapsed = time.perf_counter() - started
        if out.shape[1] != input_ids.shape[1] + new_tokens:
            got = out.shape[1] - input_ids.shape[1]
            raise RuntimeError(f"generate returned {got} tokens, not {new_tokens}")
        return elapsed

    def measure(self, batch: int, warmups: int, full_warmup: bool) -> dict[str, Any]:
        """full_warmup: warm up with the exact timed shapes (a static cache is sized per call, and
        compiled graphs are specialized to it); else one short generate()."""
        input_ids = self.prompts(batch)
        for _ in range(warmups):
            for new_tokens in ((1, self.args.new_tokens) if full_warmup else (2,)):
                self.timed(input_ids, new_tokens)
        first_s = self.timed(input_ids, 1)
        total_s = self.timed(input_ids, self.args.new_tokens)
        n = self.args.new_tokens
        decode = batch * (n - 1) / (total_s - first_s) if total_s > first_s else None
        return {"batch": batch, "new_tokens": n, "prompt_len": self.args.prompt_len, "generate_s": total_s,
                "total_tok_s": batch * n / total_s, "decode_tok_s": decode, "prefill_plus_1_token_s": first_s}

    def _sync(self) -> None:
        import torch

        if str(self.args.device).startswith("cuda"):
            torch.cuda.synchronize()


def each_batch(budget: Budget, batches: list[int], measure: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in batches:
        if budget.exceeded():
            results[str(batch)] = budget.skip_note()
            continue
        try:
            results[str(batch)] = measure(batch)
        except Exception as exc:  # noqa: BLE001 -- recorded; the other batch sizes still run
            results[str(batch)] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return results


def use_static_compiled(model: Any, args: argparse.Namespace) -> str:
    """Static KV cache + torch.compile. On CUDA, transformers' generate() compiles the forward
    itself once the cache is static (its CompileConfig: mode reduce-overhead), so wrapping the
    forward too would compile twice; elsewhere (or with another backend) it is wrapped here."""
    import torch

    model.generation_config.cache_implementation = "static"
    if str(args.device).startswith("cuda") and args.compile_backend == "inductor":
        return "generate() auto-compile (static cache, CompileConfig defaults)"
    options = {"mode": "reduce-overhead"} if args.compile_backend == "inductor" else {}
    model.forward = torch.compile(model.forward, backend=args.compile_backend, fullgraph=True, **options)
    return f"torch.compile(model.forward, backend={args.compile_backend!r}, fullgraph=True, {options})"


def compiled_graph_count() -> int | None:
    """Graphs torch.compile (dynamo) has produced in this process: 0 means nothing was compiled and
    the "compile" numbers are a static cache run eagerly."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = ResultFile(args.json, {"kind": "hf_baseline", "model": str(args.model), "quick": args.quick,
                                     "args": {k: v for k, v in vars(args).items()}})
    missing = torch_missing_reason()
    if missing:
        results.data["skipped"] = missing
        results.save()
        print(f"hf_baseline skipped: {missing}", flush=True)
        return 0
    import torch
    import transformers

    results.data["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    holder: dict[str, Any] = {}

    def load(_budget: Budget) -> dict[str, Any]:
        started = time.perf_counter()
        holder["model"] = load_model(args)
        card = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else str(args.device)
        return {"load_s": time.perf_counter() - started, "device_name": card, "dtype": args.dtype}

    results.run_section("load", args.budget_s, load)
    if "model" not in holder:
        return 1
    generator = Generator(holder["model"], args)
    if "eager" in args.section_list:
        results.run_section("eager", args.budget_s, lambda budget: each_batch(
            budget, args.batch_list, lambda b: generator.measure(b, warmups=1, full_warmup=False)))
    if "compile" in args.section_list:
        def compiled(budget: Budget) -> dict[str, Any]:
            how = use_static_compiled(holder["model"], args)
            measured = each_batch(budget, args.compile_list,
                                  lambda b: generator.measure(b, warmups=2, full_warmup=True))
            return {"how": how, "dynamo_graphs_compiled": compiled_graph_count(), **measured}
        results.run_section("compile", args.budget_s, compiled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
