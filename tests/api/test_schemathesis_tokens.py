"""Generated input against every operation of the spec of a service with tokens turned on,
judged by all of schemathesis' default checks (tests/api/fuzz_live.py says how), each case
on live resources of its own. Calls carry a tenant's token (through schemathesis' auth hook;
the admin's on the token routes), so schemathesis also checks that each operation refuses the
call without a token and with a wrong one; the cases it generates without the token must be
refused too. (tests/api/test_schemathesis.py runs the open service.)"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import schemathesis
from pydantic import SecretStr
from schemathesis.python import asgi

from app.config import Settings
from app.main import create_app
from tests.api.auth_helpers import ADMIN, bearer
from tests.api.fuzz_live import (
    EXCLUDED,
    SEEDS,
    Caller,
    Tally,
    check_floor,
    fuzz_schema,
    fuzz_settings,
    run_case,
    run_seed,
    with_token,
)

_DB_DIR = tempfile.mkdtemp(prefix="vkmmu-fuzz-tokens-")
atexit.register(shutil.rmtree, _DB_DIR, True)
APP = create_app(
    Settings(
        database_url=f"sqlite+aiosqlite:///{_DB_DIR}/vkmmu.db",
        admin_token=SecretStr(ADMIN),
        # Off: a 429 would only say the test ran fast (the limiter has tests of its own).
        token_rate_per_s=0,
    )
)
# Fewer than the open service's run (tests/api/fuzz_live.py EXAMPLES): each call here also
# brings schemathesis' probes without a token and with a wrong one, and the generated bodies
# are the same in both runs.
EXAMPLES = 2
CALLER = Caller(client=None, admin=bearer(ADMIN))
schema = fuzz_schema(APP)
TALLY = Tally()

NOT_REACHED: dict[str, str] = {}


@pytest.fixture(scope="module")
def caller() -> Iterator[Caller]:
    with asgi.get_client(APP) as client:
        r = client.post("/v1/tokens", json={"tenant": "fuzz"}, headers=bearer(ADMIN))
        assert r.status_code == 201, r.text
        CALLER.client = client
        CALLER.head = bearer(r.json()["token"])
        yield CALLER
    asgi.shutdown_lifespans()


@schema.parametrize()
@with_token(schema, CALLER)
@fuzz_settings(EXAMPLES)
def test_generated_calls_with_a_token_keep_the_contract(
    case: schemathesis.Case, caller: Caller
) -> None:
    run_case(case, caller, TALLY, EXCLUDED)


@pytest.mark.parametrize("op", sorted(SEEDS))
def test_seeded_call_with_a_token_reaches_a_2xx(op: str, caller: Caller) -> None:
    run_seed(schema, op, caller, TALLY, EXCLUDED)


def test_every_operation_reached_a_2xx_with_a_token() -> None:
    if not TALLY.calls or len(TALLY.seeded_ok) < len(SEEDS):
        pytest.skip("the generated cases did not run in this session")
    print(check_floor(schema, TALLY, NOT_REACHED))
