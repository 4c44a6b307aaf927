"""schemathesis against the service's own /openapi.json: no 5xx, every answer matches the schema.

Driven through hypothesis directly (one strategy per operation), not schemathesis' pytest
plugin, which does not load under pytest 9.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis  # a dev dependency: missing = failing, never skipped
from helpers import start_server as start
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance


def test_every_operation_conforms(tiny_artifact: Path) -> None:
    proc, url = start(tiny_artifact, CLASSIFIER_WORKERS="1")
    try:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "POST /classify", "POST /classify/batch", "GET /healthz", "GET /readyz", "GET /model", "GET /metrics"}
        for op in operations:
            @given(case=op.as_strategy())
            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=True)  # the same examples every run: CI must not flip on luck
            def check(case: Any) -> None:
                # "schema-valid data must be accepted" cannot hold here: random bytes are a
                # schema-valid `image` and must get 400; every other check runs
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            check()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
