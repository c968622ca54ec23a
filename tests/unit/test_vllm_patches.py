"""Our vLLM plugin: found through its metadata, and it makes CPU compile artifacts loadable."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled

from hermes_serve.vllm_patches import PLUGINS_PATH, load_aot_compile_cache
from tests.support.servers import REPO


def test_vllm_finds_the_plugin_where_the_engine_puts_it() -> None:
    """As vLLM's spawned processes do: sys.path as the engine leaves it, then vLLM's loader."""
    code = (
        f"import sys; sys.path.append({str(PLUGINS_PATH)!r}); "
        "from vllm.plugins import load_plugins_by_group; "
        "print(sorted(load_plugins_by_group('vllm.general_plugins')))"
    )
    found = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "hermes_aot_compile_cache" in found.stdout


def test_a_stock_inductor_artifact_can_be_finalised_after_loading() -> None:
    class Compiled:  # what torch deserialises: a callable with serialize(), nothing more
        def serialize(self) -> bytes:
            return b""

        def __call__(self) -> str:
            return "ran"

    loaded = Bundled(Compiled())
    assert "finalize_loading" not in Bundled.__dict__, "torch defines it now: the plugin can go"
    with pytest.raises(AttributeError, match="finalize_loading"):
        loaded.finalize_loading(None)  # vLLM's loader then compiles again: the bug
    try:
        load_aot_compile_cache()
        assert loaded.finalize_loading(None) is None and loaded() == "ran"
    finally:
        delattr(Bundled, "finalize_loading")
