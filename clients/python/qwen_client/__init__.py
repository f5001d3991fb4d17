"""Python client for qwen-serve: `QwenClient` (typed, synchronous) and the `qwen-client` CLI."""
from qwen_client.client import DEFAULT_TARGET, QwenClient, QwenError
from qwen_client.types import (
    Completion,
    Event,
    Finished,
    GenerateOptions,
    Started,
    TokenDelta,
    TokenLogprob,
    Tokens,
    TopLogprob,
)

__all__ = [
    "DEFAULT_TARGET",
    "Completion",
    "Event",
    "Finished",
    "GenerateOptions",
    "QwenClient",
    "QwenError",
    "Started",
    "TokenDelta",
    "TokenLogprob",
    "Tokens",
    "TopLogprob",
]
