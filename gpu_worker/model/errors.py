"""Typed errors of the GGUF model layer.

Every problem found while opening a model file is a `GGUFLoadError` subclass whose message names
the file and the field (a header field, a metadata key or a tensor name), so that a bad file gives
one clear line instead of a traceback.
"""
from __future__ import annotations

import os


class GGUFLoadError(Exception):
    """A GGUF file could not be loaded. `field` names the header field, key or tensor at fault."""

    def __init__(self, path: str | os.PathLike[str], field: str, message: str) -> None:
        self.path = str(path)
        self.field = field
        self.message = message
        super().__init__(f"{self.path}: {field}: {message}")

    def __reduce__(self):  # keep pickling (e.g. across processes) working with 3 args
        return (type(self), (self.path, self.field, self.message))


class FileUnreadable(GGUFLoadError):
    """The file does not exist or cannot be opened / memory-mapped."""


class BadMagic(GGUFLoadError):
    """The first 4 bytes are not b'GGUF'."""


class UnsupportedVersion(GGUFLoadError):
    """GGUF version other than 2 or 3 (or a byte-swapped, big-endian file)."""


class Truncated(GGUFLoadError):
    """The header or metadata runs past the end of the file."""


class SizeOverflow(GGUFLoadError):
    """A count, length or size is larger than the file could possibly hold."""


class InvalidValue(GGUFLoadError):
    """A value is malformed: bad UTF-8, unknown value type, duplicate key, wrong type for a key,
    bad alignment or an out-of-range config value."""


class TensorOutOfBounds(GGUFLoadError):
    """A tensor's data lies (partly) outside the file or is misaligned."""


class UnknownArchitecture(GGUFLoadError):
    """general.architecture is not one this project serves (qwen2)."""


class MissingKey(GGUFLoadError):
    """A required metadata key is absent."""


class MissingTensor(MissingKey):
    """A required tensor is absent."""


class ShapeMismatch(GGUFLoadError):
    """A tensor's shape disagrees with the config, or a dimension is invalid for its type."""


class UnsupportedTensorType(GGUFLoadError):
    """A tensor uses a GGML type this project cannot dequantize."""


class ModelFetchError(Exception):
    """The default model could not be downloaded, assembled or verified (size / sha256)."""
