"""The engine's arguments per profile, checked through vLLM's own parser (no engine started);
its watchdog, over the scripted engine on virtual time."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from hermes_serve.config import SettingsError, load_settings, parse_settings
from hermes_serve.engine import MAX_RESTARTS, RESTART_WINDOW_S, Engine, engine_cli_args, engine_environment
from tests.support import asgi
from tests.support.virtual import elapse

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vllm_parser():  # type: ignore[no-untyped-def]
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def profile(name: str):  # type: ignore[no-untyped-def]
    return load_settings({"HERMES_CONFIG": str(REPO / name)})


def test_gpu_profile_renders_hermes_3_on_one_gpu(vllm_parser) -> None:  # type: ignore[no-untyped-def]
    settings = profile("configuration.gpu.yaml")
    args = vllm_parser.parse_args(engine_cli_args(settings, "/models/hermes"))
    assert args.model == "/models/hermes"
    assert args.served_model_name == ["hermes-3-8b"]
    assert args.dtype == "bfloat16"
    assert args.max_model_len == 8192
    assert args.gpu_memory_utilization == 0.85
    assert args.tensor_parallel_size == 1
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    assert engine_environment(settings) == {}


def test_gpu_profile_bentoml_resources_follow_tensor_parallel() -> None:
    document = yaml.safe_load((REPO / "configuration.gpu.yaml").read_text())
    settings = profile("configuration.gpu.yaml")
    assert document["services"]["hermes"]["resources"]["gpu"] == settings.model.tensor_parallel_size
    assert "resources" not in yaml.safe_load((REPO / "configuration.yaml").read_text())["services"]["hermes"]


def test_tensor_parallel_is_configurable(vllm_parser) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings({"device": "gpu", "model": {"tensor_parallel_size": 2}})
    assert vllm_parser.parse_args(engine_cli_args(settings, "m")).tensor_parallel_size == 2


def test_cpu_profile_bounds_the_kv_cache_and_leaves_gpu_memory_alone(vllm_parser) -> None:  # type: ignore[no-untyped-def]
    settings = profile("configuration.yaml")
    argv = engine_cli_args(settings, "/models/smol")
    assert "--gpu-memory-utilization" not in argv
    args = vllm_parser.parse_args(argv)
    assert args.served_model_name == ["smollm2-135m-instruct"] and args.max_model_len == 2048
    environment = engine_environment(settings, {})
    assert environment["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert settings.model.cpu_preload  # tcmalloc and Intel OpenMP, where installed (below)
    assert set(environment) <= {"VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD"}


def test_engine_args_pass_through_last(vllm_parser) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings({"model": {"engine_args": ["--max-num-seqs", "7"]}})
    argv = engine_cli_args(settings, "m")
    assert argv[-2:] == ["--max-num-seqs", "7"]
    assert vllm_parser.parse_args(argv).max_num_seqs == 7


def test_no_tool_parser_means_no_auto_tool_choice() -> None:
    argv = engine_cli_args(parse_settings({"model": {"tool_call_parser": None}}), "m")
    assert "--enable-auto-tool-choice" not in argv


def test_priority_scheduling_and_cached_token_counts_are_always_on(vllm_parser) -> None:  # type: ignore[no-untyped-def]
    args = vllm_parser.parse_args(engine_cli_args(parse_settings({}), "m"))
    assert args.scheduling_policy == "priority" and args.enable_prompt_tokens_details


def test_lora_is_on_only_with_adapters(vllm_parser) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings(
        {
            "model": {
                "adapters": [{"name": "a", "source": "x:1"}, {"name": "b", "source": "/b"}],
                "max_lora_rank": 8,
                "max_loras": 2,
            }
        }
    )
    args = vllm_parser.parse_args(engine_cli_args(settings, "m", {"a": "/store/a", "b": "/b"}))
    assert args.enable_lora and args.max_lora_rank == 8 and args.max_loras == 2
    assert {(m.name, m.path) for m in args.lora_modules} == {("a", "/store/a"), ("b", "/b")}
    assert not vllm_parser.parse_args(engine_cli_args(parse_settings({}), "m")).enable_lora


def test_adapter_names_must_not_clash() -> None:
    with pytest.raises(SettingsError, match="adapter names"):
        parse_settings({"model": {"adapters": [{"name": "smollm2-135m-instruct", "source": "/a"}]}})


def test_cpu_preload_puts_tcmalloc_and_intel_openmp_first_and_keeps_what_was_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hermes_serve import engine

    (tmp_path / "system").mkdir()
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    tcmalloc = tmp_path / "system" / engine.TCMALLOC
    iomp = tmp_path / "venv" / "lib" / engine.IOMP
    tcmalloc.touch()
    iomp.touch()
    monkeypatch.setattr(engine, "TCMALLOC_DIRS", (str(tmp_path / "none"), str(tmp_path / "system")))
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    on = parse_settings({"model": {"cpu_preload": True}})
    environment = engine_environment(on, {"LD_PRELOAD": f"/opt/libother.so:{tcmalloc}"})
    assert environment["LD_PRELOAD"] == f"{tcmalloc}:{iomp}:/opt/libother.so"
    assert "LD_PRELOAD" not in engine_environment(parse_settings({"model": {"cpu_preload": False}}), {})
    assert "LD_PRELOAD" not in engine_environment(parse_settings({"device": "gpu", "model": {"cpu_preload": True}}), {})


def test_cpu_preload_skips_and_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hermes_serve import engine

    monkeypatch.setattr(engine, "TCMALLOC_DIRS", (str(tmp_path),))
    monkeypatch.setattr("sys.prefix", str(tmp_path))
    assert "LD_PRELOAD" not in engine_environment(parse_settings({"model": {"cpu_preload": True}}), {})
    assert "libtcmalloc-minimal4" in caplog.text and "intel-openmp" in caplog.text


# --- the watchdog: a dead engine is started again, within a budget ---------------------------


async def kill(app: Any) -> None:
    """The scripted engine dies as vLLM's does: under a request, which gets vLLM's 500."""
    body = {"messages": [{"role": "user", "content": "[[die]]"}]}
    assert (await asgi.call(app, "POST", "/v1/chat/completions", body)).status == 500


SPACING_S = RESTART_WINDOW_S / MAX_RESTARTS  # deaths this far apart never exhaust the budget


@pytest.mark.parametrize(("apart_s", "stops"), [(1, True), (SPACING_S - 1, True), (SPACING_S, False)])
async def test_a_dead_engine_starts_again_until_it_dies_too_often_in_the_window(
    apart_s: float, stops: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One death more than MAX_RESTARTS within RESTART_WINDOW_S stops the worker; a death that
    has left the window no longer counts. On virtual time, the window's edge is exact."""
    monkeypatch.setattr(Engine, "_note_exit_signals", lambda self: None)  # pytest keeps its handlers
    outcomes: asyncio.Queue[str] = asyncio.Queue()
    engine = Engine(
        parse_settings({}),
        on_fatal=lambda: outcomes.put_nowait("stopped"),
        on_restarted=lambda app: outcomes.put_nowait("restarted"),
    )
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    noticed: list[float] = []
    try:
        await engine.start("fake://")
        for _ in range(MAX_RESTARTS + 1):
            await elapse(apart_s - 0.5)  # half a second before the watchdog's look that sees it
            await kill(engine.app)
            seen.append(await outcomes.get())
            noticed.append(loop.time())
        assert seen == ["restarted"] * MAX_RESTARTS + ["stopped" if stops else "restarted"]
        assert [t - noticed[0] for t in noticed] == pytest.approx([i * apart_s for i in range(MAX_RESTARTS + 1)])
        assert engine.ready is not stops
    finally:
        await engine.stop()
