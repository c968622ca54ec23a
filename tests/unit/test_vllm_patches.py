"""Our vLLM plugin: found through its metadata; it makes CPU compile artifacts loadable, and
vLLM's workers end with their engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import psutil
import pytest
from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled

from hermes_serve.vllm_patches import PLUGINS_PATH, WORKER_NAME_PREFIX, load_aot_compile_cache
from tests.support.servers import REPO


def test_vllm_finds_the_plugin_where_the_engine_puts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """As vLLM's spawned processes do: sys.path as the engine leaves it, then vLLM's loader."""
    from vllm.plugins import load_plugins_by_group

    monkeypatch.setattr(sys, "path", [*sys.path, str(PLUGINS_PATH)])
    found = load_plugins_by_group("vllm.general_plugins")
    assert {"hermes_aot_compile_cache", "hermes_die_with_the_engine"} <= set(found)


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


ENGINE = """
import multiprocessing, os, sys, threading
from hermes_serve.vllm_patches import die_with_the_engine

def worker(ready):
    die_with_the_engine()  # what vLLM's plugin loader calls in each of its processes
    ready.set()
    threading.Event().wait()  # busy for good, as a worker stuck in its loop

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=worker, args=(ready,), name=sys.argv[1], daemon=True)
    child.start()
    assert ready.wait(60)  # the plugin has run in the child
    open(sys.argv[2], "w").write(str(child.pid))  # not stdout: the child holds that open
    os._exit(0)  # as a SIGKILLed engine: no clean-up, no join
"""
OUTLIVES_S = 2  # the control's: a child without the signal is still alive this long after


def _orphan_after_its_engine_dies(tmp_path: Path, name: str, dies: bool) -> psutil.Process | None:
    """The child, if it outlives its engine (spawn needs the script in a file). ``dies``: the
    death is expected, so wait for it (its signal is sent as the engine exits); otherwise give
    it ``OUTLIVES_S`` to die."""
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    subprocess.run(
        [sys.executable, str(script), name, str(tmp_path / "pid")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    child = psutil.Process(int((tmp_path / "pid").read_text()))  # alive when written: the premise
    try:
        child.wait(timeout=60 if dies else OUTLIVES_S)
    except psutil.TimeoutExpired:
        return child
    return None


def vllms_worker_name(rank: int) -> str:
    """The name vLLM's executor gives its worker of this rank, from its own code: the process
    is recorded, never started. A rename in vLLM fails the test below."""
    from vllm.v1.executor import multiproc_executor

    named: list[str] = []

    class Context:  # the multiprocessing context vLLM asks for
        def Pipe(self, duplex: bool) -> tuple[mock.Mock, mock.Mock]:
            return mock.Mock(), mock.Mock()

        def Process(self, name: str, **options: Any) -> mock.Mock:
            named.append(name)
            return mock.Mock()

    no_numa = SimpleNamespace(parallel_config=SimpleNamespace(numa_bind=False))
    with mock.patch.object(multiproc_executor, "get_mp_context", Context):
        multiproc_executor.WorkerProc.make_worker_process(
            vllm_config=no_numa,
            local_rank=rank,
            rank=rank,
            distributed_init_method="",
            input_shm_handle=None,
            shared_worker_lock=None,
            is_driver_worker=rank == 0,
        )
    (name,) = named
    return name


def test_a_worker_dies_with_the_engine_that_started_it(tmp_path: Path) -> None:
    name = vllms_worker_name(rank=1)
    assert name.startswith(WORKER_NAME_PREFIX), f"vLLM names its workers {name!r} now: the plugin skips them"
    assert _orphan_after_its_engine_dies(tmp_path, name, dies=True) is None


def test_other_processes_are_left_to_their_own_ends(tmp_path: Path) -> None:
    """The control: without the plugin's signal a child outlives its parent (so the test
    above can fail), and only vLLM's workers get the signal."""
    orphan = _orphan_after_its_engine_dies(tmp_path, "SomethingElse-0", dies=False)
    assert orphan is not None
    orphan.kill()
