"""Settings: read once at start-up from ``configuration.yaml``, BentoML's override variables
and ``HERMES_*`` environment variables (read by pydantic-settings), validated into one frozen
pydantic object.

The file is BentoML's own configuration file. BentoML accepts nothing of ours at its top
level, but passes unknown keys of a service's section through, so our settings sit beside
BentoML's (``traffic``, ``resources``...) in ``services.hermes``.

Nothing reads the environment at import time; callers pass the mapping in.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, EnvSettingsSource
from pydantic_settings import SettingsError as PydanticSettingsError
from pydantic_settings.sources.utils import parse_env_vars

SERVICE_NAME = "hermes"
SECTION = f"services.{SERVICE_NAME}"
# BentoML's own keys in a service's section (its v2 configuration schema): left to BentoML.
BENTOML_SERVICE_KEYS = frozenset(
    [
        "name",
        "batching",
        "resources",
        "extra_ports",
        "replicate_process",
        "workers",
        "threads",
        "traffic",
        "backlog",
        "max_runner_connections",
        "runner_connection",
        "metrics",
        "logging",
        "http",
        "grpc",
        "ssl",
        "runner_probe",
        "monitoring",
        "tracing",
        "envs",
    ]
)
ENV_PREFIX = "HERMES_"
ENV_NESTING = "__"
CONFIG_PATH_VARS = ("HERMES_CONFIG", "BENTOML_CONFIG")
DEFAULT_CONFIG_FILE = "configuration.yaml"


class _Section(BaseModel):
    # Each field's docstring is its description: the README's tables are generated from them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Adapter(_Section):
    name: str = Field(min_length=1)
    """the `model` clients send to use it"""
    source: str = Field(min_length=1)
    """a BentoML store tag or a local directory (PEFT format)"""


class ModelSettings(_Section):
    source: str = "smollm2-135m-instruct:latest"
    """BentoML store tag, local HF directory, or hub id"""
    served_name: str = "smollm2-135m-instruct"
    """the `model` clients send and `/v1/models` lists"""
    dtype: str = "bfloat16"
    """weights dtype"""
    max_model_len: int = Field(2048, gt=0)
    """context length (prompt + completion)"""
    tensor_parallel_size: int = Field(1, gt=0)
    """GPUs per engine; keep `services.hermes.resources.gpu` equal"""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """GPU only: fraction of GPU memory for weights + KV cache"""
    cpu_kvcache_space_gib: int | None = Field(2, gt=0)
    """CPU only: KV-cache size in whole GiB (vLLM reads it with `int()`; for a finer size pass `--kv-cache-memory-bytes` in `engine_args`)"""
    cpu_preload: bool = True
    """CPU only: preload tcmalloc (Debian `libtcmalloc-minimal4`) and Intel OpenMP (`intel-openmp`, installed) into the engine's processes, as vLLM's CPU guide advises; one not found is skipped with a warning"""
    tool_call_parser: str | None = "hermes"
    """vLLM tool parser; `null` turns tool calling off"""
    shutdown_timeout_s: int = Field(20, ge=0)
    """on SIGTERM, let running requests finish this long"""
    adapters: list[Adapter] = []
    """LoRA adapters served beside the base model (`[{name, source}]`); reloaded without a restart when LoRA was on at start"""
    max_lora_rank: int = Field(16, gt=0)
    """largest adapter rank the engine accepts"""
    max_loras: int = Field(4, gt=0)
    """adapters in one batch at once (more are swapped in as needed)"""
    engine_args: list[str] = []
    """extra vLLM flags, passed through (`["--max-num-seqs","64"]`)"""
    upstream: str = ""
    """an engine's or a router's base URL (`http://vllm-router:8000`): the gateway relays every API there and starts no engine; empty: the in-process engine"""
    upstream_api_key: str = ""
    """the gateway's own credential toward `upstream` (give it as `HERMES_MODEL__UPSTREAM_API_KEY`); a client's key never travels there"""
    upstream_connect_timeout_s: float = Field(5, gt=0)
    """longest wait to connect to `upstream` → 503"""
    upstream_read_timeout_s: float = Field(300, gt=0)
    """longest wait for `upstream`'s next bytes → 502 (or an error event mid-stream)"""
    tenant_secret: str = ""
    """the secret of every key's cache salt and tenant id (`HERMES_MODEL__TENANT_SECRET`): replicas in front of one engine pool share it, so a key keeps its engines and cached prefixes whichever replica it reaches; empty: one of this process's own"""

    @model_validator(mode="after")
    def _unique_adapters(self) -> ModelSettings:
        names = [a.name for a in self.adapters]
        clashes = sorted({n for n in names if names.count(n) > 1 or n == self.served_name})
        if clashes:
            raise ValueError(f"adapter names must differ from each other and from served_name: {', '.join(clashes)}")
        return self


class ApiKey(_Section):
    name: str = Field(min_length=1)
    """shown in logs and metrics; the key itself never is"""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """the key's SHA-256 (hex); give this or `key_env`"""
    key_env: str | None = None
    """an environment variable holding the key (container secrets)"""
    enabled: bool = True
    """`false` refuses the key"""
    requests_per_minute: int | None = Field(None, gt=0)
    """requests per rolling minute"""
    tokens_per_minute: int | None = Field(None, gt=0)
    """prompt + completion tokens per rolling minute"""
    requests_per_day: int | None = Field(None, gt=0)
    """requests per calendar day (UTC)"""
    tokens_per_day: int | None = Field(None, gt=0)
    """prompt + completion tokens per calendar day (UTC)"""
    tokens_per_month: int | None = Field(None, gt=0)
    """prompt + completion tokens per calendar month (UTC)"""
    expires_at: datetime | None = None
    """from this time on the key gets 401 (ISO 8601; UTC unless it names a zone)"""
    max_concurrency: int | None = Field(None, gt=0)
    """this key's share of the engine: its sequences running at once (a request asking for `n` counts `n`)"""
    priority: int = 0
    """higher is admitted first from the queue and scheduled first in the engine"""
    models: list[str] | None = None
    """the models (base or adapters) it may use; `null`: all"""
    share_cache_with: str | None = None
    """a group name: keys of one group share cached prompt prefixes (otherwise each key has its own)"""
    admin: bool = False
    """may read every key's usage (`/v1/organization/usage/completions`, the console's team charts)"""

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKey:
        if (self.sha256 is None) == (self.key_env is None):
            raise ValueError("give exactly one of 'sha256' or 'key_env'")
        return self


class AuthSettings(_Section):
    enabled: bool = True
    """`false` serves without keys (never by default)"""
    keys: list[ApiKey] = []
    """named keys (table below); reloaded without a restart"""
    metrics_require_key: bool = False
    """whether `/metrics` needs a key"""
    reload_interval_s: float = Field(5, ge=0)
    """how often the file is checked for changed keys (also on SIGHUP); `0`: only on SIGHUP"""

    @model_validator(mode="after")
    def _unique_names(self) -> AuthSettings:
        names = [k.name for k in self.keys]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate key names: {', '.join(duplicates)}")
        return self


class AdmissionSettings(_Section):
    max_concurrency: int = Field(64, gt=0)
    """sequences inside the engine at once: a request asking for `n` counts `n` (one asking for more runs alone)"""
    max_queue: int = Field(50, ge=0)
    """requests waiting beyond that; more → 503"""
    queue_timeout_s: float = Field(120, gt=0)
    """longest wait in the queue → 504"""
    request_timeout_s: float = Field(600, gt=0)
    """longest whole request → 504 (or an error event mid-stream)"""


class ServerSettings(_Section):
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    """larger request bodies → 413"""
    max_n: int = Field(16, gt=0)
    """most sequences one request may ask for (`n`, `best_of` on chat and completions); more → 400"""
    cors_origins: list[str] = []
    """browser origins allowed to call the API (`["https://app.example.com"]`); empty: none (CORS closed)"""


class UsageSettings(_Section):
    store: str = ""
    """where every request is recorded: `sqlite:///path`, `postgresql://user:pass@host/db` (several replicas: one database), or `none`; empty: SQLite in `state_dir`"""
    retention_days: float = Field(90, gt=0)
    """per-request rows are pruned after this many days; the hourly rollups (budgets, usage API) are kept"""


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """BentoML's home (where the models live too), so a container's one volume keeps both."""
    return Path(environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "hermes-serve"


class Settings(_Section):
    device: Literal["cpu", "gpu"] = "cpu"
    """`cpu` or `gpu`: which engine settings apply"""
    model: ModelSettings = ModelSettings()
    auth: AuthSettings = AuthSettings()
    admission: AdmissionSettings = AdmissionSettings()
    limits_storage: str = "memory://"
    """`redis://host:6379` to share limits between replicas"""
    limits_on_storage_failure: Literal["refuse", "allow"] = "refuse"
    """while that storage is unreachable, keys with limits are refused (503, budgets hold) or `allow`ed uncounted (their usage is counted when it is back)"""
    server: ServerSettings = ServerSettings()
    usage: UsageSettings = UsageSettings()
    state_dir: str = ""
    """what must survive a restart (the SQLite usage ledger, its spill file); one per replica; empty: `$BENTOML_HOME/hermes-serve`"""

    def state_path(self, environ: Mapping[str, str]) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir(environ)

    def usage_store_url(self, environ: Mapping[str, str]) -> str:
        """``usage.store``, or the SQLite file in the state directory."""
        return self.usage.store or f"sqlite:///{self.state_path(environ) / 'usage.db'}"


def reference(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every setting as (dotted key, default, environment variable, meaning), in file order."""
    rows = []
    for name, info in model.model_fields.items():
        key = prefix + name
        section = info.annotation if isinstance(info.annotation, type) else None
        if section is not None and issubclass(section, BaseModel):
            rows += reference(section, key + ".")
        else:
            rows.append(
                (
                    key,
                    _yaml_scalar(info.get_default()),
                    env_var_for(key) if model is not ApiKey else "",
                    info.description or "",
                )
            )
    return rows


def reference_table(model: type[BaseModel] = Settings) -> str:
    """The Markdown table the README shows (``python -m hermes_serve.config table``)."""
    if model is ApiKey:
        lines = ["| key field | default | meaning |", "|---|---|---|"]
        lines += [f"| `{k}` | {d} | {m} |" for k, d, _, m in reference(ApiKey)]
    else:
        lines = ["| key | default | env var | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {d} | `{e}` | {m} |" for k, d, e, m in reference(model)]
    return "\n".join(lines)


def _yaml_scalar(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


class SettingsError(ValueError):
    """A bad configuration value; the message names the key."""


def config_path(environ: Mapping[str, str], cwd: Path) -> Path:
    for var in CONFIG_PATH_VARS:
        if environ.get(var):
            return Path(environ[var])
    return cwd / DEFAULT_CONFIG_FILE


def load_settings(environ: Mapping[str, str], cwd: Path | None = None) -> Settings:
    """Settings from the config file's ``hermes:`` section, then ``HERMES_A__B=...`` overrides."""
    path = config_path(environ, cwd or Path.cwd())
    document: Any = None
    if path.exists():
        document = yaml.safe_load(path.read_text())
    elif any(environ.get(var) for var in CONFIG_PATH_VARS):
        raise SettingsError(f"config file not found: {path}")
    # Same precedence as BentoML: file < BENTOML_CONFIG_OVERRIDES < BENTOML_CONFIG_OPTIONS; ours last.
    for overrides in _bentoml_overrides(environ):
        document = {} if document is None else document
        if isinstance(document, dict):  # anything else is refused by service_section below
            _deep_merge(document, overrides)
    section = service_section(document, str(path))
    raw = {k: v for k, v in section.items() if k not in BENTOML_SERVICE_KEYS}
    _overlay_environment(raw, environ)
    settings = parse_settings(raw, origin=str(path))
    _check_gpu_reservation(settings, section.get("resources"), str(path))
    return settings


def service_section(document: Any, origin: str) -> dict[str, Any]:
    """``services.hermes``, whole: our keys beside BentoML's (``traffic``, ``resources``...)."""
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SettingsError(f"{origin}: expected a mapping at the top level")
    section = (document.get("services") or {}).get(SERVICE_NAME) or {}
    if not isinstance(section, dict):
        raise SettingsError(f"{origin}: {SECTION} must be a mapping")
    return section


def _check_gpu_reservation(settings: Settings, resources: Any, origin: str) -> None:
    # BentoML reserves resources.gpu devices for the worker; vLLM shards over
    # tensor_parallel_size of them. A mismatch fails late and obscurely inside vLLM.
    gpus = resources.get("gpu") if isinstance(resources, dict) else None
    if settings.device == "gpu" and gpus is not None and gpus != settings.model.tensor_parallel_size:
        raise SettingsError(
            f"invalid configuration in {origin}: {SECTION}.resources.gpu is {gpus} but "
            f"{SECTION}.model.tensor_parallel_size is {settings.model.tensor_parallel_size}; make them equal"
        )


def parse_settings(raw: Mapping[str, Any], origin: str = "<settings>") -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{SECTION}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise SettingsError(f"invalid configuration in {origin}: {problems}") from None


def _bentoml_overrides(environ: Mapping[str, str]) -> list[Any]:
    """BentoML's run-time override variables, as documents shaped like the config file."""
    documents: list[Any] = []
    if environ.get("BENTOML_CONFIG_OVERRIDES"):
        try:
            documents.append(json.loads(environ["BENTOML_CONFIG_OVERRIDES"]))
        except json.JSONDecodeError as exc:
            raise SettingsError(f"BENTOML_CONFIG_OVERRIDES is not JSON: {exc}") from None
    if environ.get("BENTOML_CONFIG_OPTIONS"):
        document: dict[str, Any] = {}
        for option in shlex.split(environ["BENTOML_CONFIG_OPTIONS"]):
            dotted, _, value = option.partition("=")
            _set_path(document, dotted.split("."), yaml.safe_load(value), "BENTOML_CONFIG_OPTIONS")
        documents.append(document)
    return documents


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


class _EnvironOverlay(EnvSettingsSource):
    """pydantic-settings' reading of ``HERMES_A__B=...`` (nesting, JSON for lists and
    mappings), over the mapping it is given instead of ``os.environ``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        # It reads only the fields and config of the class, which any pydantic model has; a
        # BaseSettings would also read os.environ whenever it is built, tests included.
        settings_cls = cast(type[BaseSettings], Settings)
        super().__init__(
            settings_cls,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter=ENV_NESTING,
            case_sensitive=False,
            env_parse_none_str="null",  # as in the YAML file: HERMES_MODEL__TOOL_CALL_PARSER=null
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def _overlay_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    # Applied last, after the file and BentoML's overrides: pydantic-settings would rank its
    # sources itself, but BentoML's override variables are not among them.
    try:
        overrides = _EnvironOverlay(environ)()
    except PydanticSettingsError as exc:
        raise SettingsError(f"{ENV_PREFIX}* environment: {exc}") from None
    _deep_merge(raw, overrides)


def _set_path(document: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = document
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SettingsError(f"{origin}: {part} is not a section")
    node[path[-1]] = value


def env_var_for(dotted_key: str) -> str:
    """``model.max_model_len`` -> ``HERMES_MODEL__MAX_MODEL_LEN`` (for docs and errors)."""
    return ENV_PREFIX + ENV_NESTING.join(dotted_key.upper().split("."))


def main(argv: list[str] | None = None) -> int:
    """``python -m hermes_serve.config check``: validate before the slow engine start."""
    import os
    import sys

    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"hermes-serve: {exc}", file=sys.stderr)
        return 2
    command = argv[0] if argv else "check"
    answers = {
        "check": "configuration OK",
        "table": reference_table() + "\n\n" + reference_table(ApiKey),
        "model-source": settings.model.source,
        "served-name": settings.model.served_name,
        "cpu-preload": "yes" if settings.device == "cpu" and settings.model.cpu_preload else "no",
    }
    print(answers.get(command, f"unknown command {command!r}; one of {sorted(answers)}"))
    return 0 if command in answers else 2


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
