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
from collections.abc import Callable
from typing import Any

from .config import Settings

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


def engine_environment(settings: Settings) -> dict[str, str]:
    """Environment the engine's child processes need (they are spawned, so they inherit it)."""
    env: dict[str, str] = {}
    if settings.device == "cpu" and settings.model.cpu_kvcache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.model.cpu_kvcache_space_gib)
    return env


class Engine:
    """Owns the engine client for the service's lifetime; ``app`` is vLLM's OpenAI FastAPI app."""

    def __init__(self, settings: Settings, on_death: Callable[[], None]) -> None:
        self._settings = settings
        self._on_death = on_death
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._adapters: dict[str, str] = {}
        self.app: Any = None

    @property
    def ready(self) -> bool:
        return self._client is not None and not self._client.errored

    async def start(self, model_path: str, adapter_paths: dict[str, str] | None = None) -> Any:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        os.environ.update(engine_environment(self._settings))
        parser = make_arg_parser(FlexibleArgumentParser())
        args = parser.parse_args(engine_cli_args(self._settings, model_path, adapter_paths))
        validate_parsed_serve_args(args)

        client = await self._stack.enter_async_context(build_async_engine_client(args))
        tasks = await client.get_supported_tasks()
        app = build_app(args, tasks, client.model_config)
        await init_app_state(client, app.state, args, tasks)
        self._client, self.app = client, app
        self._adapters = dict(adapter_paths or {})
        self._note_exit_signals()
        self._watchdog = asyncio.create_task(self._watch())
        return app

    @property
    def served_models(self) -> frozenset[str]:
        return frozenset({self._settings.model.served_name, *self._adapters})

    async def use_adapters(self, adapter_paths: dict[str, str]) -> None:
        """Load and unload LoRA adapters in the running engine, as the configuration now lists
        them. vLLM allows it only when LoRA was on at start (some adapter configured then)."""
        if adapter_paths == self._adapters:
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
            if self._adapters.get(name) != path:
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
        # vLLM's own server exits when the engine core dies; in-process we must do it
        # ourselves, or readiness stays green while every request fails.
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._client is not None and self._client.errored and not self._stopping:
                logger.critical("vLLM engine died; stopping this worker so it is restarted")
                self._on_death()
                return

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
