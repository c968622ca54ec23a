"""hermes-serve: the BentoML service. Wiring only; behaviour lives in ``hermes_serve``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import bentoml
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from hermes_serve import errors
from hermes_serve.admission import AdmissionQueue
from hermes_serve.auth import KeyRing
from hermes_serve.bentoml_patches import label_traffic_metrics_by_route
from hermes_serve.clock import wall_time
from hermes_serve.config import Settings, config_path, load_settings
from hermes_serve.engine import Engine
from hermes_serve.gateway import Front, Gateway, with_cors
from hermes_serve.ledger import ledger_for
from hermes_serve.limits import Limits
from hermes_serve.metrics import GatewayMetrics, sample_event_loop
from hermes_serve.models import adapter_paths, resolve_model_path
from hermes_serve.patches import warn_outside_ranges
from hermes_serve.reload import ConfigWatcher, watch
from hermes_serve.supervisor import forward_sighup
from hermes_serve.upstream import Upstream
from hermes_serve.usage import budgets
from hermes_serve.usage.store import open_store
from hermes_serve.usage.writer import Writer, report

logger = logging.getLogger("hermes_serve")
# In `bentoml serve`'s own process (the supervisor), SIGHUP then reloads keys, not workers.
forward_sighup()
label_traffic_metrics_by_route()  # before BentoML builds the app around ours


class LateBound:
    """The ASGI app BentoML mounts at import time; the gateway is plugged in at start-up."""

    app: ASGIApp | None = None
    gateway: Gateway | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await errors.send_error(send, errors.not_ready())


API_ROUTES = "/v1/"  # a regular expression searched in the URL (OpenTelemetry's excluded_urls)
front = LateBound()
# BentoML needs an app to mount; Front (below) hands it every path but its probes and /metrics.
mounted = Starlette(routes=[Mount("/", app=front)])


@bentoml.service(
    name="hermes",
    workers=1,  # one engine per worker: two engines would fight for the same cores/GPU
    traffic={"timeout": 3600},  # our admission and request_timeout_s decide, not BentoML's
    # Every streamed chunk passes BentoML's middlewares (docs/benchmarks.md, the per-token gap):
    # the API's routes skip its OpenTelemetry spans (one per chunk) and its access log (the
    # gateway logs one line per request). A configuration file can turn either back on.
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": [API_ROUTES]},
)
@bentoml.asgi_app(mounted, path="/")
class HermesService:
    def __init__(self) -> None:
        self.engine: Engine | Upstream | None = None
        self.limits: Limits | None = None
        self.usage: Writer | None = None
        self.stop_watching: Callable[[], None] = lambda: None
        self.tasks: list[asyncio.Task[None]] = []

    @bentoml.on_startup
    async def start(self) -> None:
        logger.setLevel(logging.INFO)  # our access log: one line per request, key name only
        warn_outside_ranges()  # names each patch of others' internals not written for what is installed
        settings = load_settings(os.environ)
        keyring = KeyRing.from_settings(settings.auth, os.environ)
        if keyring.generated_key:
            # Printed once, so a fresh install is never open by accident.
            print(
                "\n  No API keys configured: generated one for this run:\n"
                f"  {keyring.generated_key}\n"
                "  Configure services.hermes.auth.keys (python -m hermes_serve.auth new NAME) to keep one.\n",
                flush=True,
            )
        metrics = GatewayMetrics()
        counters = ledger_for(settings.limits_storage)
        self.limits = Limits(
            counters,
            settings.admission.request_timeout_s,
            on_storage_failure=settings.limits_on_storage_failure,
            storage_state=metrics.limits_storage_up.set,
        )
        admission = AdmissionQueue(settings.admission.max_concurrency, settings.admission.max_queue)
        store = open_store(settings.usage_store_url(os.environ))
        if store is not None:
            spill = settings.state_path(os.environ) / "usage-spill.jsonl"
            self.usage = usage = Writer(store, spill, retention_days=settings.usage.retention_days)
            await usage.start()
            self.tasks.append(
                asyncio.create_task(
                    report(
                        usage,
                        metrics.usage_queue,
                        metrics.usage_rows_written,
                        metrics.usage_write_failures,
                        metrics.usage_rows_spilled,
                    )
                )
            )
            # Before the first request: a restart must not give a key its day's budget back.
            await budgets.check(counters, store, keyring.principals, wall_time(), usage.flush)
        gateway = Gateway(settings, keyring, self.limits, admission, metrics, usage=self.usage)
        if store is not None:
            principals = lambda: gateway.keyring.principals  # noqa: E731
            self.tasks.append(
                asyncio.create_task(budgets.keep_restored(counters, store, principals, flush=usage.flush))
            )
        front.gateway, front.app = gateway, with_cors(gateway, settings.server.cors_origins)

        def restarted(app: Any) -> None:  # the engine died and runs again
            metrics.engine_restarts.inc()
            gateway.attach(app, lambda: engine.ready, served=lambda: engine.served_models)

        engine: Engine | Upstream
        if settings.model.upstream:  # engines elsewhere, behind a router: this process relays
            self.engine = engine = Upstream(settings)
        else:
            self.engine = engine = Engine(
                settings, on_fatal=lambda: os.kill(os.getpid(), signal.SIGTERM), on_restarted=restarted
            )

        async def apply(new: Settings) -> None:  # a reloaded configuration file
            await engine.use_adapters(adapter_paths(new))
            gateway.use_keys(KeyRing.from_settings(new.auth, os.environ, reloading=gateway.keyring))
            if store is not None:  # a budget given to a key today counts what it already spent
                await budgets.restore(counters, store, gateway.keyring.principals, wall_time())

        watcher = ConfigWatcher(
            config_path(os.environ, Path.cwd()), lambda: load_settings(os.environ), apply, settings, metrics
        )
        self.stop_watching = watch(watcher, settings.auth.reload_interval_s)
        self.tasks.append(asyncio.create_task(sample_event_loop(metrics.event_loop_tasks)))
        if isinstance(engine, Upstream):
            app: Any = await engine.start()
        else:
            app = await engine.start(resolve_model_path(settings.model.source), adapter_paths(settings))
        gateway.attach(app, lambda: engine.ready, served=lambda: engine.served_models)
        logger.info("serving %s", ", ".join(sorted(engine.served_models)))

    @bentoml.on_shutdown
    async def stop(self) -> None:
        self.stop_watching()
        for task in self.tasks:
            task.cancel()
        if self.engine is not None:
            await self.engine.stop()
        if self.usage is not None:  # after the last request: every row written, or spilled for the next start
            await self.usage.close()
        if self.limits is not None:
            await self.limits.close()

    async def __is_ready__(self) -> bool:
        return self.engine is not None and self.engine.ready


# The decorator made HermesService a bentoml.Service; its stubs still say "class".
cast("bentoml.Service[Any]", HermesService).add_asgi_middleware(Front, gateway_app=front, gateway=lambda: front.gateway)
