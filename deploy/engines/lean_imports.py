"""Imports of transformers' modules that skip work the kit never uses, on the CPU start-up path.

`transformers.cache_utils` imports hqq whenever hqq is installed (the kit installs it for 4-bit
weights on a CPU), for a quantized KV cache class the kit never uses. hqq pulls in torch._dynamo:
1.4 s of the default recipe's 6.6 s to the first token on this project's 2-core CPU. The kit's
HQQ weights load through hqq itself (transformers_engine.py), later and only when a recipe has
them, so cache_utils is imported once with transformers' probe for hqq answering no.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def cache_utils_without_hqq() -> ModuleType:
    """transformers.cache_utils, imported without importing hqq (if nothing imported it yet)."""
    if "transformers.cache_utils" in sys.modules:
        return sys.modules["transformers.cache_utils"]
    import transformers.utils as utils

    probe = getattr(utils, "is_hqq_available", None)
    if probe is None:  # another transformers layout: import it as it is
        return importlib.import_module("transformers.cache_utils")
    utils.is_hqq_available = lambda *args, **kwargs: False
    try:
        return importlib.import_module("transformers.cache_utils")
    finally:
        utils.is_hqq_available = probe
