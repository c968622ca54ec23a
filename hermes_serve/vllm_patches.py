"""Fixes to vLLM 0.32 that run inside its engine processes, as a vLLM general plugin.

vLLM runs its engine and workers in processes it spawns, where nothing of ours is imported;
it does call every ``vllm.general_plugins`` entry point in each of them. Ours is declared in
``vllm_plugins/*.dist-info``, a directory ``engine.py`` puts on ``sys.path`` (spawned
processes inherit it), so no install step is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLUGINS_PATH = Path(__file__).with_name("vllm_plugins")


def load_aot_compile_cache() -> None:
    """Let warm starts load the compiled model instead of compiling it again (35-150 s on CPU).

    On CPU, vLLM compiles with torch's stock ``inductor`` backend, whose AOT artifact loads as
    torch's ``BundledAOTAutogradSerializableCallable``; vLLM's loader then calls
    ``compiled_fn.finalize_loading(config)``, which only its own backend's artifacts have, and
    treats the AttributeError as a cache miss: "Compiling model again due to a load failure
    ... 'function' object has no attribute 'finalize_loading'". A stock-inductor artifact is
    ready once deserialised, so there is nothing to finalise. If torch or vLLM ever define it,
    this steps aside.
    """
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled
    except ImportError:
        return
    if "finalize_loading" in Bundled.__dict__:
        return

    def finalize_loading(self: Any, vllm_config: Any) -> None:
        return None

    setattr(Bundled, "finalize_loading", finalize_loading)  # noqa: B010 (torch does not declare it)
