"""The CUDA backend on the real default model against the numpy reference (CpuBackend) of the same
arithmetic (fp16 operands for the tensor-core linear kernel, float32 for the mat-vec one): top-1
agreement over 64 teacher-forced positions of each fixture chat prompt (HF's own continuation),
and greedy 32-token continuations. Needs the model file and a GPU (gpu_suite.sh MODEL=...)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu_worker.backends.cpu.backend import CpuBackend
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step, generate
from gpu_worker.backends.cuda.weights import stored_tensor_bytes
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.qwen2_reference import load_weights
from gpu_worker.sampling.params import SamplingParams

from batch_runner import run_batch

pytestmark = [pytest.mark.gpu, pytest.mark.real_model]
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf_reference_q4_k_m.npz"
BLOCK, POSITIONS, GREEDY_TOKENS, NUM_PROMPTS = 16, 64, 32, 5


@pytest.fixture(scope="module")
def reference(real_model_path):
    """The real model and, per arithmetic (fp16 operands or not), a numpy reference backend with a
    cache of its results, made on first use."""
    model = load_gguf(real_model_path)
    references: dict[bool, tuple[CpuBackend, dict]] = {}

    def for_arithmetic(fp16_operands: bool) -> tuple[CpuBackend, dict]:
        if fp16_operands not in references:
            cpu = CpuBackend(model, load_weights(model, fp16_operands=fp16_operands))
            cpu.allocate_kv_cache(num_blocks=64, block_size=BLOCK)
            references[fp16_operands] = cpu, {}
        return references[fp16_operands]

    return model, for_arithmetic


@pytest.fixture(scope="module", params=[("mma", False), ("fp32", False), ("fp32", True)],
                ids=["mma", "fp32", "fp32-fused"])
def models(request, cuda_device, reference):
    from gpu_worker.backends.cuda.backend import CudaBackend

    model, for_arithmetic = reference
    linear, fused = request.param
    with cuda_device.activate():
        gpu = CudaBackend(model, max_num_tokens=1024, max_num_seqs=64, max_model_len=512, device=cuda_device,
                          fused=fused, linear=linear)
        gpu.allocate_kv_cache(num_blocks=1024, block_size=BLOCK)
        yield model, gpu, for_arithmetic(linear == "mma")
        gpu.close()


def test_weight_bytes_match_the_file(models):
    """The file's tensor bytes, q/k/v of the 12 layers with a Q8_0 v re-encoded in Q8_0
    (weights.qkv_device_types), plus alignment padding."""
    model, gpu, _ = models
    file_bytes = sum(t.nbytes for t in model.tensors.values())
    stored = stored_tensor_bytes(model)
    print(f"weights on the GPU: {gpu.weight_bytes:,} bytes; tensors in the file: {file_bytes:,} bytes, "
          f"{stored:,} as stored")
    assert stored <= gpu.weight_bytes <= stored + 256 * len(model.tensors)


def test_teacher_forced_top1_agrees_with_the_reference(models):
    _, gpu, (cpu, cache) = models
    ref = np.load(FIXTURE)
    for p in range(NUM_PROMPTS):
        ids = ref[f"p{p}_token_ids"]
        rows = np.arange(len(ids) - POSITIONS, len(ids))
        step = build_step([SequenceChunk(tuple(int(t) for t in ids), 0, blocks_for(0, len(ids), BLOCK))], BLOCK)
        gpu_top1 = gpu.logits(step, rows).argmax(-1)
        if ("top1", p) not in cache:
            cache["top1", p] = cpu.logits(step, rows).argmax(-1)
        cpu_top1 = cache["top1", p]
        agreement = float((gpu_top1 == cpu_top1).mean())
        print(f"prompt {p}: top-1 agreement with the numpy reference {agreement:.1%} over {POSITIONS} positions")
        assert agreement >= 0.99


def test_greedy_continuations_match_the_reference(models):
    _, gpu, (cpu, cache) = models
    ref = np.load(FIXTURE)
    prompts = [ref[f"p{p}_token_ids"][:int(ref[f"p{p}_prompt_len"])].tolist() for p in range(NUM_PROMPTS)]
    greedy = SamplingParams(temperature=0.0)
    gpu_out = run_batch(gpu, prompts, [greedy] * NUM_PROMPTS, GREEDY_TOKENS)
    same = 0
    for p, prompt in enumerate(prompts):
        if ("greedy", p) not in cache:
            cache["greedy", p] = generate(cpu, prompt, GREEDY_TOKENS, block_size=BLOCK)
        cpu_out = cache["greedy", p]
        same += gpu_out[p] == cpu_out
        print(f"prompt {p}: greedy {GREEDY_TOKENS} tokens identical: {gpu_out[p] == cpu_out}")
    assert same >= NUM_PROMPTS - 1
