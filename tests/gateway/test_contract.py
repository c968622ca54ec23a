"""Fuzzing from our own contract (over the scripted engine, whose request schemas stand in
for vLLM's): schemathesis reads /openapi.json and sends what it allows
(and its edge cases) to every public route, with a valid key. No answer may be a server
error, and every answer must match the documented status codes, content types and schemas."""

from __future__ import annotations

from collections import Counter
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.support.servers import Server

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
# vLLM's request schemas allow more than either vLLM or the gateway accepts (max_tokens past
# the context, an empty message list...): a 400 for schema-valid data is expected here, so
# schemathesis's "valid data must be accepted" check stays off; every other check is on.
EXAMPLES = settings(
    max_examples=90, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


def test_every_answer_matches_the_contract(server: Server, record_property: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")  # base URL: the document's own
    # "fuzz" has no limits: over the scripted engine every generation is instant, and no
    # answer depends on how much of a rolling minute earlier cases used (the run is
    # derandomised, so it is the same run every time).
    headers = {"Authorization": f"Bearer {server.keys['fuzz']}"}
    cases: Counter[str] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:

        @EXAMPLES
        @given(case=operation.as_strategy())
        def answers_match(case: schemathesis.Case) -> None:
            cases[case.operation.label] += 1
            case.call_and_validate(headers=headers, timeout=60, checks=CHECKS)

        answers_match()
    record_property("fuzzed_cases", dict(cases))
    print(f"fuzzed {sum(cases.values())} cases: {dict(cases)}")
    assert sum(cases.values()) >= 1000, cases
    assert set(cases) == {operation.label for operation in operations} and len(cases) >= 15, cases
