"""The whole CUDA backend on a synthetic model of the real shapes and the real file's tensor types
(Q5_0 / Q8_0 / Q4_K / Q6_K / F32): logits against the numpy reference (CpuBackend), decode graphs
against eager steps bitwise, and batch invariance of sampled tokens (alone, in 8, in 64, chunked)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from gpu_worker.backends.cpu.backend import CpuBackend
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step
from gpu_worker.backends.cuda.weights import stored_tensor_bytes
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.qwen2_reference import load_weights
from gpu_worker.model.synthetic import write_synthetic_gguf
from gpu_worker.sampling.params import SamplingParams

from batch_runner import run_batch

pytestmark = pytest.mark.gpu
BLOCK = 16
# Logits vs the numpy reference of the same arithmetic, after 24 layers of random synthetic weights:
# fp32 mat-vecs differ from BLAS in summation order only (1e-5 observed); the tensor-core forward
# rounds operands to fp16, so a last-bit difference before a rounding flips an fp16 operand, and
# random layers amplify that by prompt: 3.3e-4 to 5.8e-3 over eight random prompt sets on an H200
# (2026-11-28). Bitwise agreement between layouts is checked apart (f16 layouts, batch invariance).
LOGITS_REL_TOLERANCE = {"fp32": 1e-3, "mma": 1e-2}


def real_like_types(num_layers: int = 24) -> dict[str, QType]:
    """The tensor types of qwen2.5-coder-0.5b-instruct-q4_k_m.gguf."""
    types = {"token_embd.weight": QType.Q5_0, "output.weight": QType.Q8_0}
    for i in range(num_layers):
        for part in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            types[f"blk.{i}.{part}.weight"] = QType.Q5_0
        types[f"blk.{i}.attn_v.weight"] = QType.Q8_0 if i % 2 else QType.Q5_0
        types[f"blk.{i}.ffn_down.weight"] = QType.Q6_K if i % 2 else QType.Q4_K
    return types


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "real-shapes.gguf"
    write_synthetic_gguf(path, real_shapes=True, weight_type=real_like_types(), seed=7)
    model = load_gguf(path)
    yield model
    model.close()


@pytest.fixture(scope="module", params=[("mma", False), ("fp32", False), ("fp32", True)],
                ids=["mma", "fp32", "fp32-fused"])
def backend(request, cuda_device, synthetic_model):
    """Every forward: tensor-core linear layers (the default), fp32 mat-vecs with 12 launches per
    layer, and the fused fp32 one (norm in the mat-vec prologue, accumulate / SwiGLU epilogues)."""
    from gpu_worker.backends.cuda.backend import CudaBackend

    linear, fused = request.param
    with cuda_device.activate():
        b = CudaBackend(synthetic_model, max_num_tokens=4096, max_num_seqs=64, max_model_len=1024,
                        device=cuda_device, fused=fused, linear=linear)
        assert (b.fused, b.linear) == (fused, linear)
        b.allocate_kv_cache(num_blocks=4096, block_size=BLOCK)
        yield b
        b.close()


def rel_error(out, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(out, np.float64) - expected) / np.linalg.norm(expected))


def top1_agrees(gpu_logits: np.ndarray, cpu_logits: np.ndarray) -> bool:
    """Same argmax in every row whose reference top-2 margin exceeds 10x that row's largest
    |GPU - reference| difference (a closer race may flip on rounding alone: random weights and
    prompts make near-ties). Rows that close are skipped; at least one row must be decisive."""
    top2 = np.sort(cpu_logits, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 10 * np.abs(gpu_logits - cpu_logits).max(axis=-1)
    assert decisive.any(), "every row is a near-tie: the check would be empty"
    return bool(np.array_equal(gpu_logits.argmax(-1)[decisive], cpu_logits.argmax(-1)[decisive]))


def test_weight_bytes_are_the_file_tensor_bytes(backend, synthetic_model):
    """The file's tensor bytes, but q/k/v re-encoded where weights.qkv_device_types says (Q4_0/Q5_0
    parts next to a Q8_0 one, as in the default model), plus alignment padding."""
    stored = stored_tensor_bytes(synthetic_model)
    assert stored <= backend.weight_bytes <= stored + 256 * len(synthetic_model.tensors)
    assert backend.memory_bytes["kv"] == 4096 * BLOCK * synthetic_model.config.kv_bytes_per_token


def test_logits_match_the_numpy_reference(backend, synthetic_model):
    """Against the reference of the same arithmetic (fp16 operands for the tensor-core kernel)."""
    cpu = CpuBackend(synthetic_model, load_weights(synthetic_model, fp16_operands=backend.linear == "mma"))
    cpu.allocate_kv_cache(num_blocks=64, block_size=BLOCK)
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 151936, n).tolist() for n in (9, 40, 64)]
    tables = [blocks_for(8 * i, 70, BLOCK) for i in range(3)]
    prefill = build_step([SequenceChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)], BLOCK)
    gpu_logits, cpu_logits = backend.logits(prefill), cpu.logits(prefill, prefill.query_start_loc[1:] - 1)
    errors = [rel_error(gpu_logits, cpu_logits)]
    agree = [top1_agrees(gpu_logits, cpu_logits)]
    tokens = gpu_logits.argmax(-1)
    for step in range(3):  # decode steps through step() (CUDA graph) vs the reference
        decode = build_step([SequenceChunk((int(tok),), len(p) + step, t)
                             for tok, p, t in zip(tokens, prompts, tables)], BLOCK)
        backend.step(decode)
        gpu_logits, cpu_logits = backend.last_logits(3), cpu.logits(decode, np.arange(3))
        errors.append(rel_error(gpu_logits, cpu_logits))
        agree.append(top1_agrees(gpu_logits, cpu_logits))
        tokens = gpu_logits.argmax(-1)
    print(f"logits rel error vs numpy reference per step: {['%.2e' % e for e in errors]}; top-1 {agree}")
    assert not np.isnan(gpu_logits).any()
    assert max(errors) < LOGITS_REL_TOLERANCE[backend.linear]
    assert all(agree)


def test_f16_layouts_leave_the_forward_bitwise_unchanged(backend):
    """The f16 layouts (fp16 copies of W and x in the weight scratch) run the contract's arithmetic:
    a 450-token prefill (f16 tiles on every matrix but k/v) gives bitwise the logits that the other
    layouts give when the weight scratch is withheld."""
    if backend.linear != "mma":
        pytest.skip("the f16 layouts serve the tensor-core forward only")
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 151936, n).tolist() for n in (150, 300)]
    tables = [blocks_for(1000, 150, BLOCK), blocks_for(1100, 300, BLOCK)]
    step = build_step([SequenceChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)], BLOCK)
    linear = backend.forward.linear_mma
    assert linear.can_f16gemm(backend.weights.layers[0].o, 450)
    with_f16 = backend.logits(step)
    scratch = linear._weight_scratch_elems
    linear._weight_scratch_elems = 0   # no weight scratch: the launcher picks among the other layouts
    try:
        assert not linear.can_f16gemm(backend.weights.layers[0].o, 450)
        without_f16 = backend.logits(step)
    finally:
        linear._weight_scratch_elems = scratch
    assert not np.isnan(with_f16).any()
    np.testing.assert_array_equal(with_f16, without_f16)


def test_launchers_and_replayed_launches_give_the_same_bits(backend, cuda_device, synthetic_model):
    """The default launcher (cuLaunchKernelEx, launcher.py) records an eager forward's launches per
    shape and replays them the next time: the same prefill replayed gives bitwise the recorded
    one's logits, and a prefill of other prompts of the same shape (replayed) and graph-replayed
    decode steps give bitwise what PyCUDA's own launches give."""
    from gpu_worker.backends.cuda.backend import CudaBackend

    if backend.device.launch_mode != "driver":
        pytest.skip("compares the driver launcher with PyCUDA's")
    other_mode = "pycuda"
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 151936, n).tolist() for n in (7, 90, 200)]
    tables = [blocks_for(300 + 20 * i, 230, BLOCK) for i in range(3)]
    prefill = build_step([SequenceChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)], BLOCK)
    other_prompts = [rng.integers(0, 151936, len(p)).tolist() for p in prompts]
    other_prefill = build_step([SequenceChunk(tuple(p), 0, blocks_for(600 + 20 * i, 230, BLOCK))
                                for i, p in enumerate(other_prompts)], BLOCK)
    decodes = [build_step([SequenceChunk((int(rng.integers(0, 151936)),), len(p) + s, t)
                           for p, t in zip(prompts, tables)], BLOCK) for s in range(3)]

    def run(b):
        outputs = [b.logits(prefill)]
        replayed = b.forward.replayed_runs
        if b.device.launch_mode != "pycuda":
            again = b.logits(prefill)   # the same KV rewritten by the replayed launches
            np.testing.assert_array_equal(again, outputs[0])
        outputs.append(b.logits(other_prefill))   # replayed with other inputs on the driver launcher
        if b.device.launch_mode != "pycuda":
            assert b.forward.replayed_runs == replayed + 2, "a prefill of a recorded shape was not replayed"
        for decode in decodes:
            b.step(decode)   # graph replay (bucket 4)
            outputs.append(b.last_logits(3))
        return outputs

    expected = run(backend)
    device = cuda_device.child(launch_mode=other_mode)
    other = CudaBackend(synthetic_model, max_num_tokens=4096, max_num_seqs=64, max_model_len=1024,
                        device=device, fused=backend.fused, linear=backend.linear)
    try:
        assert other.device.launch_mode == other_mode
        other.allocate_kv_cache(num_blocks=1024, block_size=BLOCK)
        for got, want in zip(run(other), expected):
            assert not np.isnan(want).any()
            np.testing.assert_array_equal(got, want)
    finally:
        other.close()
        device.close()


def test_decode_graph_replay_equals_eager_step(backend):
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 151936, n).tolist() for n in (5, 12, 30)]
    tables = [blocks_for(100 + 4 * i, 40, BLOCK) for i in range(3)]
    backend.logits(build_step([SequenceChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)], BLOCK))
    decode = build_step([SequenceChunk((11 + i,), len(p), t) for i, (p, t) in enumerate(zip(prompts, tables))],
                        BLOCK)
    eager = backend.logits(decode)
    backend.step(decode)  # replays the bucket-4 graph (3 rows + 1 padding row), rewriting the same KV
    assert backend.graphs is not None and backend.graphs.bucket_for(3) == 4
    assert np.array_equal(backend.last_logits(3), eager)


def test_tokens_are_batch_invariant(backend):
    rng = np.random.default_rng()
    target = rng.integers(0, 151936, 37).tolist()
    params = SamplingParams(temperature=0.7, seed=1234, top_p=0.95)
    new = 12
    alone = run_batch(backend, [target], [params], new)[0]

    def others(count):
        prompts = [rng.integers(0, 151936, int(n)).tolist() for n in rng.integers(3, 60, count)]
        ps = [SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.2])), seed=int(s), top_k=int(k))
              for s, k in zip(rng.integers(0, 2**32, count), rng.choice([0, 20], count))]
        return prompts, ps

    for count in (1, 7, 63):   # 2 sequences: decode steps with the norms folded in, as alone (1)
        prompts, ps = others(count)
        position = int(rng.integers(0, count + 1))
        prompts.insert(position, target)
        ps.insert(position, params)
        batched = run_batch(backend, prompts, ps, new)
        assert batched[position] == alone, f"differs in a batch of {count + 1}"
    for chunk in (5, 16):
        assert run_batch(backend, [target], [params], new, prefill_chunk=chunk)[0] == alone, f"chunk {chunk}"
    print(f"batch invariance: {new} tokens identical alone / in 2 / in 8 / in 64 / chunked 5 and 16: {alone}")


def test_overlapped_engine_steps_equal_synchronous_ones(backend, synthetic_model):
    """The engine submits decode step N + 1 before reading step N (its input ids copied on the
    device from step N's samples): tokens, logprobs and finishes equal the synchronous engine's,
    with an abort between steps."""
    from gpu_worker.engine.engine import Engine, FinishOut, TokenOut
    from gpu_worker.engine.sequence import RequestSpec
    from gpu_worker.sampling.params import StoppingParams

    rng = np.random.default_rng()
    specs = []
    for key in range(20):
        prompt = tuple(int(t) for t in rng.integers(0, 151936, int(rng.integers(3, 60))))
        params = SamplingParams(temperature=float(rng.choice([0.0, 0.8])), seed=int(rng.integers(0, 2**32)),
                                top_k=int(rng.choice([0, 20])), logprobs=bool(key % 3 == 0), top_logprobs=key % 4)
        specs.append(RequestSpec(key, prompt, params, StoppingParams(max_tokens=int(rng.integers(4, 24)),
                                                                    ignore_eos=True)))

    def run(overlap: bool):
        engine = Engine(backend, 4096, BLOCK, 64, 512, 1024, (151645,), synthetic_model.config.vocab_size,
                        overlap=overlap)
        for s in specs:
            assert engine.add_request(s) == []
        tokens, finished, step = {}, {}, 0
        while engine.has_work:
            if step == 6:
                finished.update({e.request_key: (e.reason, e.completion_tokens) for e in engine.abort(3)})
            for event in engine.step():
                if isinstance(event, TokenOut):
                    tokens.setdefault(event.request_key, []).append((event.token_id, event.logprobs))
                else:
                    assert isinstance(event, FinishOut)
                    finished[event.request_key] = (event.reason, event.completion_tokens)
            step += 1
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return (tokens, finished), engine.num_overlapped_steps

    synchronous, none = run(False)
    overlapped, count = run(True)
    assert none == 0 and count > 5
    assert overlapped == synchronous
