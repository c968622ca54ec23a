"""The README says what the code does: its tables are the code's, its request path the gateway's."""

from __future__ import annotations

import re

from hermes_serve import errors, gateway, routes
from hermes_serve.config import ApiKey, reference_table
from tests.support.servers import REPO

README = (REPO / "README.md").read_text()


def test_configuration_tables_list_every_setting_with_its_real_default() -> None:
    assert reference_table() in README, "regenerate it: python -m hermes_serve.config table"
    assert reference_table(ApiKey) in README


def test_the_errors_table_is_the_codes() -> None:
    assert errors.table() in README, "regenerate it: python -m hermes_serve.errors table"


def test_request_path_is_the_gateways() -> None:
    path = next(line for line in (gateway.__doc__ or "").splitlines() if line.startswith("route ->"))
    assert path in README


def test_every_route_is_in_the_status_table() -> None:
    documented = set(re.findall(r"`(?:GET|POST|DELETE)?,? ?(/[^`\s]*)`", README))
    documented |= set(re.findall(r"`(/v1/[a-z_/]+)`", README))
    for route in routes.ROUTES:
        label = re.sub(r"\{(\w+):path\}", r"{\1}", route.path)
        assert label in documented, route.path


def test_the_readme_names_no_missing_script() -> None:
    for script in set(re.findall(r"\./scripts/([a-z_-]+)", README)):
        assert (REPO / "scripts" / script).exists(), script
