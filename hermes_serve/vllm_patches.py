"""Fixes to vLLM 0.32 that run inside its engine processes, as a vLLM general plugin.

vLLM runs its engine and workers in processes it spawns, where nothing of ours is imported;
it does call every ``vllm.general_plugins`` entry point in each of them. Ours is declared in
``vllm_plugins/*.dist-info``, a directory ``engine.py`` puts on ``sys.path`` (spawned
processes inherit it), so no install step is needed.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any

PLUGINS_PATH = Path(__file__).with_name("vllm_plugins")


# Registered in patches.py as "aot-compile-cache": the versions it was written for, and why.
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKER_NAME_PREFIX = "VllmWorker"  # vLLM names its workers VllmWorker-<rank>


# Registered in patches.py as "die-with-the-engine": the versions it was written for, and why.
def die_with_the_engine() -> None:
    """A vLLM worker process ends when the engine process that started it dies.

    vLLM's worker watches a pipe for its parent's death and then shuts its queues down, but a
    worker whose engine is killed mid-step can stay in its busy loop for good. Seen here: 17
    minutes after the engine core was SIGKILLed, its orphaned worker still held 2.1 GB (the
    model; on a GPU, its memory, which the engine started again needs). The kernel's
    parent-death signal cannot be missed. Workers only: the engine core is started from a
    thread of the API process, and the signal follows the thread that started a process.
    """
    if sys.platform != "linux" or not multiprocessing.current_process().name.startswith(WORKER_NAME_PREFIX):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the line above
        os.kill(os.getpid(), signal.SIGKILL)
