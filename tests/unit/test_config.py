from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from hermes_serve.config import (
    Settings,
    SettingsError,
    config_path,
    env_var_for,
    load_settings,
    parse_settings,
)

SHA = "a" * 64


def write(tmp_path: Path, section: str) -> dict[str, str]:
    """A config file whose services.hermes section is ``section`` (YAML flow mapping)."""
    path = tmp_path / "config.yaml"
    path.write_text(f"services:\n  hermes: {section}\n")
    return {"HERMES_CONFIG": str(path)}


def test_defaults_are_the_cpu_profile() -> None:
    settings = Settings()
    assert settings.device == "cpu"
    assert settings.model.served_name == "smollm2-135m-instruct"
    assert settings.auth.enabled and settings.auth.keys == []
    assert settings.admission.max_concurrency == 64 and settings.admission.max_queue == 50


def test_reads_the_service_section_and_leaves_bentoml_keys_to_bentoml(tmp_path: Path) -> None:
    environ = write(tmp_path, "{workers: 1, traffic: {timeout: 9}, model: {served_name: m, max_model_len: 512}}")
    settings = load_settings(environ, cwd=tmp_path)
    assert settings.model.served_name == "m" and settings.model.max_model_len == 512


def test_environment_overrides_nested_keys_and_json_lists(tmp_path: Path) -> None:
    environ = write(tmp_path, "{model: {max_model_len: 512}}")
    environ |= {
        "HERMES_MODEL__MAX_MODEL_LEN": "1024",
        "HERMES_MODEL__ENGINE_ARGS": '["--max-num-seqs", "8"]',
        "HERMES_LIMITS_STORAGE": "redis://cache:6379",
        "HERMES_AUTH__KEYS": f'[{{"name": "a", "sha256": "{SHA}", "requests_per_minute": 5}}]',
        "HERMES_SERVE_UNRELATED": "ignored",  # another tool's variable is not a setting
    }
    settings = load_settings(environ, cwd=tmp_path)
    assert settings.model.max_model_len == 1024
    assert settings.model.engine_args == ["--max-num-seqs", "8"]
    assert settings.limits_storage == "redis://cache:6379"
    assert settings.auth.keys[0].requests_per_minute == 5


def test_bentoml_override_variables_reach_our_section_before_hermes_variables(tmp_path: Path) -> None:
    environ = write(tmp_path, "{admission: {max_queue: 5, max_concurrency: 4}, model: {max_model_len: 512}}")
    environ |= {
        "BENTOML_CONFIG_OVERRIDES": '{"services": {"hermes": {"admission": {"max_queue": 7}, "traffic": {"timeout": 9}}}}',
        "BENTOML_CONFIG_OPTIONS": 'services.hermes.admission.max_queue=9 services.hermes.model.served_name="my model"',
        "HERMES_MODEL__MAX_MODEL_LEN": "1024",
    }
    settings = load_settings(environ, cwd=tmp_path)
    assert settings.admission.max_queue == 9 and settings.admission.max_concurrency == 4
    assert settings.model.served_name == "my model" and settings.model.max_model_len == 1024
    del environ["BENTOML_CONFIG_OPTIONS"]
    assert load_settings(environ, cwd=tmp_path).admission.max_queue == 7


def test_gpu_reservation_follows_overrides_too(tmp_path: Path) -> None:
    """docker-compose.yml sets both from one HERMES_GPUS: they must agree after overriding."""
    environ = write(tmp_path, "{device: gpu, resources: {gpu: 1}, model: {tensor_parallel_size: 1}}")
    environ |= {"BENTOML_CONFIG_OPTIONS": "services.hermes.resources.gpu=2", "HERMES_MODEL__TENSOR_PARALLEL_SIZE": "2"}
    assert load_settings(environ, cwd=tmp_path).model.tensor_parallel_size == 2
    del environ["HERMES_MODEL__TENSOR_PARALLEL_SIZE"]
    with pytest.raises(SettingsError, match=r"resources\.gpu is 2"):
        load_settings(environ, cwd=tmp_path)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{model: {max_model_len: lots}}", "services.hermes.model.max_model_len"),
        ("{admission: {max_concurrency: 0}}", "services.hermes.admission.max_concurrency"),
        ("{server: {max_n: 0}}", "services.hermes.server.max_n"),
        ("{model: {gpu_memory_utilization: 1.5}}", "services.hermes.model.gpu_memory_utilization"),
        ("{modle: {}}", "services.hermes.modle"),
        ("{auth: {keys: [{name: a}]}}", "services.hermes.auth.keys.0"),
        (f"{{auth: {{keys: [{{name: a, sha256: '{SHA}'}}, {{name: a, sha256: '{SHA}'}}]}}}}", "duplicate key names: a"),
        ("{auth: {keys: [{name: a, sha256: NOTHEX}]}}", "services.hermes.auth.keys.0.sha256"),
        ("{device: gpu, resources: {gpu: 2}, model: {tensor_parallel_size: 1}}", "services.hermes.resources.gpu is 2"),
    ],
)
def test_a_bad_value_names_its_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
        load_settings(write(tmp_path, text), cwd=tmp_path)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("HERMES_MODEL__NOPE", "1", "services.hermes.model.nope"),
        ("HERMES_ADMISSION__MAX_QUEUE", "-1", "services.hermes.admission.max_queue"),
        ("HERMES_AUTH__KEYS", "[not json", "HERMES_* environment"),
    ],
)
def test_a_bad_environment_variable_names_its_key(tmp_path: Path, variable: str, value: str, named: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(named)):
        load_settings({**write(tmp_path, "{}"), variable: value}, cwd=tmp_path)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings({"HERMES_CONFIG": str(tmp_path / "nope.yaml")})


def test_config_path_order(tmp_path: Path) -> None:
    assert config_path({}, tmp_path) == tmp_path / "configuration.yaml"
    assert config_path({"BENTOML_CONFIG": "b.yaml"}, tmp_path) == Path("b.yaml")
    assert config_path({"BENTOML_CONFIG": "b.yaml", "HERMES_CONFIG": "h.yaml"}, tmp_path) == Path("h.yaml")


def test_shipped_configurations_parse() -> None:
    repo = Path(__file__).resolve().parents[2]
    cpu = load_settings({"HERMES_CONFIG": str(repo / "configuration.yaml")})
    gpu = load_settings({"HERMES_CONFIG": str(repo / "configuration.gpu.yaml")})
    assert cpu.device == "cpu" and gpu.device == "gpu"
    assert gpu.model.served_name == "hermes-3-8b" and gpu.model.max_model_len == 8192


def test_env_var_names() -> None:
    assert env_var_for("model.max_model_len") == "HERMES_MODEL__MAX_MODEL_LEN"
    assert env_var_for("limits_storage") == "HERMES_LIMITS_STORAGE"


def test_settings_are_frozen() -> None:
    settings = parse_settings({})
    with pytest.raises(ValidationError):
        settings.device = "gpu"  # type: ignore[misc]
