"""Property-based fuzzing of the served contract (issue 13): schemathesis generates requests from
/api/v1/openapi.json, valid and invalid ones, and every answer must be as documented: no 5xx, a status the
operation lists, a content type and body matching its published schema. Authenticated routes are driven with a real
user's token (logged in through the simulator, consent given), logged in again whenever a generated call revoked
it (DELETE /me, a consent withdrawal).

Examples per operation and mode are bounded (EXAMPLES) so the run stays within a few minutes on two cores, and
derandomized, so a failure found is found again. Every failing example is collected (not only the first), then
reported together.

schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) does not run under pytest 9 (it sets
`_nodeid` on the test item), so the operations' hypothesis strategies are driven here directly.
"""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


class FuzzUser:
    """A logged-in user whose token is renewed when a generated request revoked it."""

    def __init__(self, login):
        self._login = login
        self._api = login("fuzz")

    def headers(self) -> dict:
        if self._api.get("/api/v1/consents").status_code == 401:
            self._api = self._login("fuzz")
        return {"Authorization": f"Bearer {self._api.token}"}


def exercise(operation, mode: GenerationMode, user: FuzzUser, seen: Counter, failures: dict) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def one(case):
        seen[operation.label] += 1
        try:
            case.call_and_validate(headers=user.headers(), checks=CHECKS)
        except (FailureGroup, Exception) as failure:  # every failing example is kept, the run goes on
            failures.setdefault(f"{operation.label} [{mode.value}]: {str(failure).splitlines()[0][:300]}",
                                str(failure)[:3000])

    try:
        one()
    except Unsatisfiable:  # negative mode, for an operation with nothing to make invalid (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE, operation.label


@pytest.fixture
def contract(app):
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)


def test_every_answer_to_generated_requests_is_documented(contract, login, capsys):
    user, seen, failures = FuzzUser(login), Counter(), {}
    operations = [result.ok() for result in contract.get_all_operations()]
    for operation in operations:
        for mode in MODES:
            exercise(operation, mode, user, seen, failures)
    with capsys.disabled():
        print(f"\nfuzzed {sum(seen.values())} requests over {len(operations)} operations, "
              f"{len(failures)} distinct failures")
    assert len(operations) >= 20 and all(seen[operation.label] for operation in operations)
    assert not failures, "\n\n".join(f"{title}\n{detail}" for title, detail in sorted(failures.items()))
