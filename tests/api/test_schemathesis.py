"""Generated input against every operation of the spec: no route may answer 500.

Bounded on purpose (a few examples per operation): it looks for crashes on hostile input,
it is not a load test. Path parameters naming a VM point at one that exists, so generated
bodies reach the engine instead of stopping at 404.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi

from app.config import Settings
from app.main import create_app

# The app is built at import (cheap: its database is opened only when the lifespan starts,
# at the first call); the schema comes from the app itself, as `make openapi` writes it.
_DB_DIR = tempfile.mkdtemp(prefix="vkmmu-fuzz-")
atexit.register(shutil.rmtree, _DB_DIR, True)  # also when the test is deselected
APP = create_app(Settings(database_url=f"sqlite+aiosqlite:///{_DB_DIR}/vkmmu.db"))
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP
VMS: dict[str, str] = {}


@pytest.fixture(scope="module")
def vms() -> Iterator[dict[str, str]]:
    with asgi.get_client(APP) as client:
        for kind in ("KVM_X86_DEFAULT_VM", "KVM_X86_TDX_VM"):
            r = client.post("/v1/vms", json={"vm_type": kind, "vcpus": 2})
            assert r.status_code == 201, r.text
            VMS[kind] = r.json()["id"]
        vm = VMS["KVM_X86_DEFAULT_VM"]
        r = client.put(
            f"/v1/vms/{vm}/memslots/0",
            json={"guest_phys_addr": 0, "memory_size": 1 << 21, "userspace_addr": 0x7F00_0000_0000},
        )
        assert r.status_code == 200, r.text
        r = client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 1 << 21, "flags": 1})
        assert r.status_code == 201, r.text
    yield VMS
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_input_gets_a_500(case: schemathesis.Case, vms: dict[str, str]) -> None:
    params = case.path_parameters or {}
    if "vm" in params:
        # Alternate between a default VM and a TD, deterministically per example.
        kinds = sorted(vms)
        params["vm"] = vms[kinds[len(str(case.body)) % len(kinds)]]
    response = case.call()
    print("STAT", case.method, case.path, response.status_code)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )
