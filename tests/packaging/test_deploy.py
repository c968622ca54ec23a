"""The deployment files, validated as far as this machine allows: no Docker daemon, no cluster."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml
from kubernetes_validate import validate

from hermes_serve.config import load_settings
from tests.support.servers import REPO

GPU = load_settings({"HERMES_CONFIG": str(REPO / "configuration.gpu.yaml")})


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_reserves_gpus_and_waits_for_readiness() -> None:
    hermes = compose()["services"]["hermes"]
    (device,) = hermes["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == "${HERMES_GPUS:-1}" and GPU.model.tensor_parallel_size == 1
    check = hermes["healthcheck"]
    assert "/readyz" in " ".join(check["test"])
    assert int(check["start_period"].rstrip("s")) >= 600  # an 8B model loads for minutes
    assert hermes["restart"] == "unless-stopped"
    assert int(hermes["stop_grace_period"].rstrip("s")) > GPU.model.shutdown_timeout_s


def test_compose_takes_secrets_from_the_environment_and_offers_shared_redis() -> None:
    document = compose()
    hermes = document["services"]["hermes"]
    assert hermes["environment"]["HERMES_API_KEY"].startswith("${HERMES_API_KEY:?")
    assert hermes["environment"]["HERMES_LIMITS_STORAGE"] == "${HERMES_LIMITS_STORAGE:-memory://}"
    assert document["services"]["redis"]["profiles"] == ["shared-limits"]
    mounted = [v.split(":")[1] for v in hermes["volumes"]]
    assert "/home/bentoml/bento/src/configuration.gpu.yaml" in mounted


def test_compose_config_accepts_the_file() -> None:
    """`docker-compose config` (Debian's compose v1; CI installs it) parses and interpolates it."""
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required in CI (.ci/run installs it)")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    env = {**os.environ, "HERMES_API_KEY": "hs-example", "HERMES_GPUS": "2"}
    result = subprocess.run(
        [binary, "-f", "docker-compose.yml", "--profile", "shared-limits", "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]["hermes"]
    assert rendered["deploy"]["resources"]["reservations"]["devices"][0]["count"] in (2, "2")
    # The same number reaches vLLM and BentoML, and the service accepts the pair.
    settings = load_settings({"HERMES_CONFIG": str(REPO / "configuration.gpu.yaml"), **rendered["environment"]})
    assert settings.model.tensor_parallel_size == 2
    missing_key = subprocess.run(
        [binary, "-f", "docker-compose.yml", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "HERMES_API_KEY"},
    )
    assert missing_key.returncode != 0 and "HERMES_API_KEY" in missing_key.stderr


def kubernetes_documents() -> list[dict]:  # type: ignore[type-arg]
    return list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "hermes.yaml").read_text()))


@pytest.mark.parametrize("document", kubernetes_documents(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_kubernetes_manifests_validate_strictly(document: dict) -> None:  # type: ignore[type-arg]
    validate(document, desired_version="1.33.0", strict=True)


def test_kubernetes_replicas_share_limits_gate_on_readiness_and_drain() -> None:
    deployment = kubernetes_documents()[0]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HERMES_LIMITS_STORAGE"].startswith("redis://hermes-redis:")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["terminationGracePeriodSeconds"] > GPU.model.shutdown_timeout_s
    assert container["resources"]["limits"]["nvidia.com/gpu"] == GPU.model.tensor_parallel_size
    assert deployment["spec"]["replicas"] >= 2


CORE_KINDS = ("Deployment", "Service", "ConfigMap")


def llm_d_documents() -> list[dict]:  # type: ignore[type-arg]
    return list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "llm-d.yaml").read_text()))


@pytest.mark.parametrize(
    "document",
    [d for d in llm_d_documents() if d["kind"] in CORE_KINDS],
    ids=lambda d: f"{d['kind']}-{d['metadata']['name']}",
)
def test_the_engine_pool_manifests_validate_strictly(document: dict) -> None:  # type: ignore[type-arg]
    validate(document, desired_version="1.33.0", strict=True)


def test_the_gateways_front_the_pool_through_llm_ds_router() -> None:
    found = {(d["kind"], d["metadata"]["name"]): d for d in llm_d_documents()}
    gateway = found[("Deployment", "hermes-gateway")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["HERMES_MODEL__UPSTREAM"]["value"].startswith("http://inference-gateway")
    assert "secretKeyRef" in env["HERMES_MODEL__TENANT_SECRET"]["valueFrom"]  # shared, and a secret
    assert "nvidia.com/gpu" not in str(gateway["resources"])  # CPU only
    pool = found[("InferencePool", "vllm-pool")]["spec"]
    engine = found[("Deployment", "vllm-engine")]["spec"]["template"]
    assert pool["selector"]["matchLabels"] == engine["metadata"]["labels"]
    assert pool["endpointPickerRef"]["name"] in {name for kind, name in found if kind == "Service"}
    route = found[("HTTPRoute", "vllm-pool")]["spec"]
    assert route["rules"][0]["backendRefs"][0] == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": "vllm-pool",
    }
    assert route["parentRefs"][0]["name"] in {name for kind, name in found if kind == "Gateway"}


def test_the_one_host_pool_parses_with_its_secrets_from_the_environment() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required in CI (.ci/run installs it)")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    secrets = {"HERMES_API_KEY": "k", "HERMES_TENANT_SECRET": "t", "HERMES_POSTGRES_PASSWORD": "p"}
    command = [binary, "-f", "deploy/compose/pool.yml", "config"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **secrets})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("gateway-0", "gateway-1"):
        env = services[name]["environment"]
        assert env["HERMES_MODEL__UPSTREAM"] == "http://router:8000" and env["HERMES_MODEL__TENANT_SECRET"] == "t"
        assert env["HERMES_USAGE__STORE"].startswith("postgresql://") and "deploy" not in services[name]  # no GPU
    assert "consistent_hash" in services["router"]["command"]
    missing = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HERMES_API_KEY": "k"}
    )
    assert missing.returncode != 0 and "HERMES_TENANT_SECRET" in missing.stderr
