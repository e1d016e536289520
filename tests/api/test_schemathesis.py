"""Generated input against every operation of the open service's own spec (no admin token:
every call may be made without one), judged by all of schemathesis' default checks, each case
on live resources of its own (tests/api/fuzz_live.py says how).

Bounded on purpose (EXAMPLES derandomised generated calls per operation, plus its explicit
examples and one seeded call where SEEDS has one): it looks for crashes and contract breaks on
hostile input, it is not a load test. How many calls of each operation reached a 2xx is counted
and held to a floor by `test_every_operation_reached_a_2xx`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis.python import asgi

from app.config import Settings
from app.main import create_app
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

# The app is built at import (cheap: its database is opened only when the lifespan starts, at
# the first call); the schema comes from the app itself, as `make openapi` writes it.
_DB_DIR = tempfile.mkdtemp(prefix="vkmmu-fuzz-")
atexit.register(shutil.rmtree, _DB_DIR, True)  # also when the test is deselected
APP = create_app(Settings(database_url=f"sqlite+aiosqlite:///{_DB_DIR}/vkmmu.db"))
CALLER = Caller(client=None)  # no token: the service is open
schema = fuzz_schema(APP)
TALLY = Tally()

# Operations no call brings to a 2xx, with the reason (none today).
NOT_REACHED: dict[str, str] = {}


@pytest.fixture(scope="module")
def caller() -> Iterator[Caller]:
    with asgi.get_client(APP) as client:
        CALLER.client = client
        yield CALLER
    asgi.shutdown_lifespans()


@schema.parametrize()
@with_token(schema, CALLER)
@fuzz_settings()
def test_generated_calls_on_live_resources_keep_the_contract(
    case: schemathesis.Case, caller: Caller
) -> None:
    run_case(case, caller, TALLY, EXCLUDED)


@pytest.mark.parametrize("op", sorted(SEEDS))
def test_seeded_call_reaches_a_2xx(op: str, caller: Caller) -> None:
    run_seed(schema, op, caller, TALLY, EXCLUDED)


def test_every_operation_reached_a_2xx() -> None:
    if not TALLY.calls or len(TALLY.seeded_ok) < len(SEEDS):
        pytest.skip("the generated cases did not run in this session")
    print(check_floor(schema, TALLY, NOT_REACHED))
