"""Write GGUF files: a streaming writer, and `convert_to_f16` (every quantized 2-D weight -> F16).

    qwen-serve convert --to f16 SRC DST   (the CLI calls convert_to_f16)

Tensors are produced and written one at a time (the real model as F16 is ~1 GB; only one
tensor's float32 copy is alive at once), into `DST.tmp`, renamed into place when complete.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType
from gguf import GGUFWriter

from gpu_worker.model.dequant import dequantize
from gpu_worker.model.gguf_loader import GGUFModel, load_gguf
from gpu_worker.model.quant_types import quant_spec

# (key, value, value type, array item type or None)
MetadataItem = tuple[str, Any, VType, "VType | None"]
# (name, type, numpy shape)
TensorPlan = tuple[str, QType, tuple[int, ...]]
Progress = Callable[[str], None]

GGML_FILE_TYPE_MOSTLY_F16 = 1
# Keys the writer sets itself (architecture) or that must describe the new file, not the old one.
_KEYS_NOT_COPIED = ("general.architecture", "general.alignment", "general.file_type")


def tensor_nbytes(qtype: QType, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * quant_spec(qtype).row_nbytes(shape[-1])


def write_gguf(path: str | Path, arch: str, metadata: Iterable[MetadataItem], tensors: Sequence[TensorPlan],
               produce: Callable[[str], np.ndarray], progress: Progress | None = None) -> None:
    """Write a GGUF file; `produce(name)` returns each tensor's raw bytes (any shape, uint8 or a
    dtype of matching size), called once per tensor in `tensors` order. Atomic: written to a
    temporary name and renamed on success."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(str(tmp), arch)
    try:
        for key, value, vtype, item_type in metadata:
            if key != "general.architecture":
                writer.add_key_value(key, value, vtype, sub_type=item_type)
        for name, qtype, shape in tensors:
            nbytes = tensor_nbytes(qtype, shape)
            byte_shape = (*shape[:-1], nbytes // max(1, int(np.prod(shape[:-1], dtype=np.int64))))
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, (name, qtype, shape) in enumerate(tensors):
            raw = np.ascontiguousarray(produce(name)).reshape(-1).view(np.uint8)
            if raw.size != tensor_nbytes(qtype, shape):
                raise ValueError(f"{name}: produced {raw.size} bytes, {qtype.name}{shape} needs "
                                 f"{tensor_nbytes(qtype, shape)}")
            writer.write_tensor_data(raw)
            if progress:
                progress(f"[{index + 1}/{len(tensors)}] {name} {qtype.name} {shape}")
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def copied_metadata(model: GGUFModel, skip: Sequence[str] = _KEYS_NOT_COPIED) -> list[MetadataItem]:
    """Every metadata key of `model` with its original value type (so the copy is exact)."""
    items: list[MetadataItem] = []
    for key, value in model.metadata.items():
        if key in skip:
            continue
        vtype, item_type = model.metadata_types[key]
        items.append((key, value, VType(vtype), None if item_type is None else VType(item_type)))
    return items


def _to_f16_bytes(model: GGUFModel, name: str) -> np.ndarray:
    tensor = model.tensors[name]
    if tensor.qtype == QType.F16 or len(tensor.shape) == 1:
        return tensor.data
    values = dequantize(tensor).astype(np.float16)
    if not np.isfinite(values).all():
        raise ValueError(f"{model.path}: {name}: values overflow float16")
    return values.view(np.uint8)


def convert_to_f16(src: str | Path, dst: str | Path, progress: Progress | None = None) -> Path:
    """Write `dst`: `src` with every 2-D weight as F16 (1-D norms and biases keep their type).

    Metadata is copied with its types; general.file_type becomes 1 (mostly F16).
    """
    with load_gguf(src) as model:
        plan: list[TensorPlan] = [
            (name, t.qtype if len(t.shape) == 1 else QType.F16, t.shape) for name, t in model.tensors.items()]
        metadata = copied_metadata(model) + [
            ("general.file_type", GGML_FILE_TYPE_MOSTLY_F16, VType.UINT32, None)]
        write_gguf(dst, model.config.architecture, metadata, plan,
                   lambda name: _to_f16_bytes(model, name), progress)
    return Path(dst)
