"""The event loop is never blocked by a request: header size limit (431), JSON key/item and
nesting bounds before validation (422), capped validation answers; strict input (booleans
are JSON booleans, bodies are UTF-8)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.api.input_limits import MAX_VALIDATION_ISSUES, InputRejected, check_json_body
from app.config import Settings
from app.main import create_app
from app.services.vms import VmService
from tests.persistence.conftest import sqlite_url

MIB = 1 << 20


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    url = sqlite_url(tmp_path)
    settings = Settings(database_url=url, max_json_items=1000, max_json_depth=16)
    app = create_app(settings, service=VmService(url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def _problem(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status
    return body  # type: ignore[no-any-return]


async def _vm_with_memory(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/vms", json={"name": "limits"})
    assert r.status_code == 201, r.text
    vm = r.json()["id"]
    slot = {"slot": 0, "guest_phys_addr": 0, "memory_size": 2 * MIB, "userspace_addr": 1 << 40}
    r = await client.put(f"/v1/vms/{vm}/memslots/0", json=slot)
    assert r.status_code in (200, 201), r.text
    return str(vm)


async def test_oversized_headers_are_431(client: httpx.AsyncClient) -> None:
    body = _problem(await client.get("/healthz", headers={"X-Big": "a" * 20_000}), 431)
    assert "16384" in str(body["detail"])
    assert (await client.get("/healthz", headers={"X-Small": "a" * 1000})).status_code == 200


async def test_too_many_keys_refused_before_validation(client: httpx.AsyncClient) -> None:
    many = {f"k{i}": i for i in range(5000)}
    body = _problem(await client.post("/v1/vms", json=many), 422)
    assert "more than 1000 keys" in str(body["detail"])
    assert len(json.dumps(body)) < 2000  # the keys are not listed back
    items = {"name": "x", "junk": list(range(5000))}
    _problem(await client.post("/v1/vms", json=items), 422)


async def test_deep_nesting_refused(client: httpx.AsyncClient) -> None:
    deep = "[" * 40 + "]" * 40
    headers = {"content-type": "application/json"}
    body = _problem(await client.post("/v1/vms", content=deep, headers=headers), 422)
    assert "nests deeper than 16" in str(body["detail"])
    hostile = "[" * 200_000  # not even JSON: still a clean 422, never a 500
    _problem(await client.post("/v1/vms", content=hostile, headers=headers), 422)


async def test_validation_answers_are_capped(client: httpx.AsyncClient) -> None:
    unknown = {f"unknown_{i}": i for i in range(500)}  # under the key bound, all invalid
    body = _problem(await client.post("/v1/vms", json=unknown), 422)
    errors = body["errors"]
    assert isinstance(errors, list) and len(errors) == MAX_VALIDATION_ISSUES
    assert body["errors_total"] == 500


async def test_booleans_must_be_booleans(client: httpx.AsyncClient) -> None:
    vm = await _vm_with_memory(client)
    url = f"/v1/vms/{vm}/vcpus/0/accesses"
    for bad in (0, 1, "false", "true"):
        body = _problem(await client.post(url, json={"gpa": 0, "private": bad}), 422)
        assert "expected a JSON boolean" in json.dumps(body)
    r = await client.post(url, json={"gpa": 0, "private": False})
    assert r.status_code == 200, r.text
    r = await client.post(url, json={"gpa": 0, "private": None})
    assert r.status_code == 200, r.text


async def test_bodies_must_be_utf8(client: httpx.AsyncClient) -> None:
    raw = json.dumps({"name": "utf16"}).encode("utf-16")
    headers = {"content-type": "application/json"}
    body = _problem(await client.post("/v1/vms", content=raw, headers=headers), 422)
    assert "UTF-8" in str(body["detail"])
    ok = json.dumps({"name": "naïve"}).encode("utf-8")
    assert (await client.post("/v1/vms", content=ok, headers=headers)).status_code == 201


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        # Within the colon/comma bound: orjson's parse, the depth still checked.
        (b'{"a": ' * 5 + b"1" + b"}" * 5, "nests deeper"),
        (b'{"a": ' * 4 + b"1" + b"}" * 4, None),
        # What orjson refuses (NaN) is parsed as before, and checked the same.
        (b'{"a": ' * 5 + b"NaN" + b"}" * 5, "nests deeper"),
        # Duplicate keys count each time, though the parse keeps one.
        (b"{" + b",".join(b'"k": 1' for _ in range(11)) + b"}", "more than 10 keys"),
        (b"[" + b",".join(b"1" for _ in range(9)) + b"]", None),
        (b"[" + b",".join(b"1" for _ in range(11)) + b"]", "more than 10 keys"),
    ],
)
def test_json_bounds_hold_on_either_parse(body: bytes, refused: str | None) -> None:
    if refused is None:
        check_json_body(body, max_items=10, max_depth=4)
    else:
        with pytest.raises(InputRejected, match=refused):
            check_json_body(body, max_items=10, max_depth=4)
