"""The vLLM engine in-process, and vLLM's own OpenAI app built on it.

All arguments go through vLLM's own CLI parser, so every vLLM flag stays available to
operators (``model.engine_args``) and vLLM validates them the way its server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from . import fake_engine
from .clock import Clock, loop_time
from .config import Settings
from .vllm_patches import PLUGINS_PATH

# vLLM internals used here are registered in patches.py: "vllm-engine-client", "vllm-server-app".
logger = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 1.0


def engine_cli_args(settings: Settings, model_path: str, adapter_paths: dict[str, str] | None = None) -> list[str]:
    """The exact ``vllm serve`` arguments this service runs with (pure: unit-tested per profile).

    ``adapter_paths``: each configured LoRA adapter's directory, by name."""
    model = settings.model
    flags = {
        "--model": model_path,
        "--served-model-name": model.served_name,
        "--dtype": model.dtype,
        "--max-model-len": str(model.max_model_len),
        "--tensor-parallel-size": str(model.tensor_parallel_size),
        "--shutdown-timeout": str(model.shutdown_timeout_s),
    }
    args = [part for flag in flags.items() for part in flag]
    # The gateway logs one line per request (never prompt text); vLLM's request log stays off.
    args += ["--disable-uvicorn-access-log", "--disable-fastapi-docs"]
    # Keys' priorities reach the scheduler; usage reports cached prompt tokens, as OpenAI's does.
    args += ["--scheduling-policy", "priority", "--enable-prompt-tokens-details"]
    if adapter_paths:
        # On CPU this turns torch.compile off (slower decode): only when adapters are configured.
        args += ["--enable-lora", "--max-lora-rank", str(model.max_lora_rank), "--max-loras", str(model.max_loras)]
        args += ["--lora-modules", *(f"{name}={path}" for name, path in adapter_paths.items())]
    if settings.device == "gpu":
        args += ["--gpu-memory-utilization", str(model.gpu_memory_utilization)]
    if model.tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", model.tool_call_parser]
    return args + list(model.engine_args)


# Where vLLM's CPU guide says to find them: Debian's tcmalloc, Intel's OpenMP from its wheel.
TCMALLOC = "libtcmalloc_minimal.so.4"
TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
IOMP = "libiomp5.so"


def cpu_preload_libraries() -> list[str]:
    """tcmalloc and Intel OpenMP, by path, each where it is installed; a missing one is left out
    (and said). With Intel's OpenMP preloaded, vLLM no longer preloads torch's GNU one."""
    found = [path for d in TCMALLOC_DIRS if os.path.exists(path := os.path.join(d, TCMALLOC))][:1]
    if not found:
        logger.warning("cpu_preload: %s not found (apt-get install libtcmalloc-minimal4)", TCMALLOC)
    iomp = os.path.join(sys.prefix, "lib", IOMP)  # the venv's lib/, where the wheel puts it
    if os.path.exists(iomp):
        found.append(iomp)
    else:
        logger.warning("cpu_preload: %s not found (pip install intel-openmp)", IOMP)
    return found


def engine_environment(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment the engine's child processes need (they are spawned, so they inherit it)."""
    env: dict[str, str] = {}
    if settings.device != "cpu":
        return env
    if settings.model.cpu_kvcache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.model.cpu_kvcache_space_gib)
    if settings.model.cpu_preload:
        current = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
        libraries = cpu_preload_libraries()
        kept = [entry for entry in current.split(":") if entry and entry not in libraries]
        if libraries:
            env["LD_PRELOAD"] = ":".join([*libraries, *kept])
    return env


MAX_RESTARTS = 3
RESTART_WINDOW_S = 600.0  # more deaths than MAX_RESTARTS within this: give up, let the supervisor act


class Engine:
    """Owns the engine client for the service's lifetime; ``app`` is vLLM's OpenAI FastAPI app.

    When the engine dies (its core process killed, out of memory...), it is started again in
    this process: the API keeps answering (503 ``model_not_ready`` meanwhile) and nothing but
    the engine restarts. Past ``MAX_RESTARTS`` deaths in ``RESTART_WINDOW_S``, ``on_fatal`` is
    called (it stops the worker, so BentoML's supervisor or the container's restarts it).
    """

    def __init__(
        self,
        settings: Settings,
        on_fatal: Callable[[], None],
        on_restarted: Callable[[Any], None] = lambda app: None,
        clock: Clock = loop_time,
    ) -> None:
        self._settings = settings
        self._on_fatal = on_fatal
        self._on_restarted = on_restarted
        self._clock = clock
        self._stack = contextlib.AsyncExitStack()
        self._args: Any = None
        self._client: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._deaths: list[float] = []
        self._adapters: dict[str, str] = {}
        self._fake: str | None = None
        """The scripted engine's source (``fake://...``) when it stands in for vLLM."""
        self.app: Any = None

    @property
    def ready(self) -> bool:
        return self._client is not None and not self._client.errored

    async def start(self, model_path: str, adapter_paths: dict[str, str] | None = None) -> Any:
        self._adapters = dict(adapter_paths or {})
        if fake_engine.is_fake(model_path):
            self._fake = model_path
        else:
            self._parse_vllm_args(model_path, adapter_paths)
        app = await self._build()
        self._note_exit_signals()
        self._watchdog = asyncio.create_task(self._watch())
        return app

    def _parse_vllm_args(self, model_path: str, adapter_paths: dict[str, str] | None) -> None:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        os.environ.update(engine_environment(self._settings))
        if str(PLUGINS_PATH) not in sys.path:  # vLLM's spawned processes inherit sys.path
            sys.path.append(str(PLUGINS_PATH))
        parser = make_arg_parser(FlexibleArgumentParser())
        self._args = parser.parse_args(engine_cli_args(self._settings, model_path, adapter_paths))
        validate_parsed_serve_args(self._args)

    async def _build(self) -> Any:
        if self._fake is not None:
            client, self.app = await fake_engine.start(
                self._fake, lambda: self.served_models, self._settings.model.max_model_len
            )
            self._stack.callback(client.shutdown)
            self._client = client
            return self.app
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        client = await self._engine_client()
        tasks = await client.get_supported_tasks()
        app = build_app(self._args, tasks, client.model_config)
        await init_app_state(client, app.state, self._args, tasks)
        self._client, self.app = client, app
        return app

    async def _engine_client(self) -> Any:
        """vLLM's engine client, as its ``build_async_engine_client`` makes it, but built off the
        event loop: vLLM waits for its engine processes with blocking calls (about a minute
        here), and on a restart the API must go on answering (503, ``/livez``) meanwhile. vLLM
        supports building it outside a loop; its output handler is then started here, on ours,
        so the engine's death is seen before any request."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs.from_cli_args(self._args)
        propagate_flash_late_interaction(self._args, engine_args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        client = await asyncio.to_thread(
            AsyncLLM.from_vllm_config,
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats,
        )
        self._stack.callback(client.shutdown, timeout=vllm_config.shutdown_timeout)
        client._run_output_handler()
        await client.reset_mm_cache()
        return client

    @property
    def served_models(self) -> frozenset[str]:
        return frozenset({self._settings.model.served_name, *self._adapters})

    async def use_adapters(self, adapter_paths: dict[str, str], reload_all: bool = False) -> None:
        """Load and unload LoRA adapters in the running engine, as the configuration now lists
        them. vLLM allows it only when LoRA was on at start (some adapter configured then).
        ``reload_all``: the engine is new (restarted) and knows only its start-up list."""
        if adapter_paths == self._adapters and not reload_all:
            return
        if self._fake is not None:  # the scripted engine serves any name it is given
            self._adapters = dict(adapter_paths)
            return
        if not self._adapters:
            logger.warning("adapters changed but LoRA was off at start: restart to serve them")
            return
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

        models = self.app.state.openai_serving_models
        for name in self._adapters.keys() - adapter_paths.keys():
            await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
            del self._adapters[name]
        for name, path in adapter_paths.items():
            if self._adapters.get(name) != path or reload_all:
                result = await models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
                if isinstance(result, str):
                    self._adapters[name] = path
                else:
                    logger.error("adapter %r not loaded: %s", name, result.error.message)
        logger.info("adapters now: %s", ", ".join(sorted(self._adapters)) or "none")

    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._client = None
        await self._stack.aclose()

    async def _watch(self) -> None:
        # vLLM's own server exits when the engine core dies; in-process we notice it
        # ourselves, or readiness stays green while every request fails.
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._client is None or not self._client.errored or self._stopping:
                continue
            now = self._clock()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(self._deaths) > MAX_RESTARTS:
                logger.critical(
                    "vLLM engine died %d times in %.0fs; stopping this worker", len(self._deaths), RESTART_WINDOW_S
                )
                self._on_fatal()
                return
            logger.critical("vLLM engine died; starting it again (the API answers 503 meanwhile)")
            await self._restart()

    async def _restart(self) -> None:
        started = self._clock()
        self._client = None  # not ready from here on
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        try:  # the dead engine's processes and sockets: nothing left to drain
            await asyncio.wait_for(stack.aclose(), timeout=30)
        except Exception:
            logger.warning("the dead engine did not close cleanly", exc_info=True)
        try:
            app = await self._build()
        except Exception:
            logger.critical("the engine did not start again; stopping this worker", exc_info=True)
            self._on_fatal()
            return
        await self.use_adapters(dict(self._adapters), reload_all=True)
        self._on_restarted(app)
        logger.warning("vLLM engine running again after %.0fs", self._clock() - started)

    def _note_exit_signals(self) -> None:
        # On Ctrl-C/SIGTERM the engine's processes get the signal too and may stop before our
        # shutdown hook runs: that is the server stopping, not the engine dying.
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def note(received: int, frame: Any, previous: Any = previous) -> None:
                self._stopping = True
                if callable(previous):
                    previous(received, frame)

            try:
                signal.signal(signum, note)
            except ValueError:  # not the main thread: the flag is set by stop() instead
                return
