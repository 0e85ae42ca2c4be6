"""The one place that knows about differences between transformers versions."""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
SUPPORTED_RANGE = ">=4.57,<5.40"

# transformers renamed the cache keyword from ``past_key_values`` to ``cache`` in 5.24
# (the old name is still accepted, with a FutureWarning, until 5.40).
CACHE_KEYWORDS = ("cache", "past_key_values")


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The cache object passed under either of its names, or None."""
    for key in CACHE_KEYWORDS:
        value = kwargs.get(key)
        if value is not None:
            return value
    return None


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    """Number of positions a transformers cache already holds for one layer."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))
