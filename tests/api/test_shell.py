"""The HTTP shell: health, problem+json for every error, request ids, body limit, 404/405/500.

None of these needs the engine: they hold whatever the engine does.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.errors import ERRNO_STATUS, errno_name, errno_status
from app.engine.errors import KvmError
from app.services.vms import build_service

from .conftest import sqlite_url
from .helpers import assert_problem


@pytest.fixture
async def shell(make_client: Callable[..., Any]) -> httpx.AsyncClient:
    return await make_client()  # type: ignore[no-any-return]


async def test_healthz(shell: httpx.AsyncClient) -> None:
    r = await shell.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_readyz_ready_with_database(shell: httpx.AsyncClient) -> None:
    r = await shell.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert r.json()["database"] == "ok"


async def test_readyz_503_when_schema_missing(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    # An empty database file: reachable, but not migrated.
    url = sqlite_url(tmp_path / "empty.db")
    client = await make_client(build_service(url, run_migrations=False), database_url=url)
    body = assert_problem(await client.get("/readyz"), 503)
    assert "schema" in body["detail"]


async def test_readyz_503_when_database_unreachable(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "no-such-dir" / "x.db")
    client = await make_client(build_service(url, run_migrations=False), database_url=url)
    body = assert_problem(await client.get("/readyz"), 503)
    assert "unreachable" in body["detail"]


async def test_request_id_echoed_and_generated(shell: httpx.AsyncClient) -> None:
    r = await shell.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await shell.get("/healthz", headers={"X-Request-ID": "bad id\twith junk"})
    assert r.headers["x-request-id"] != "bad id\twith junk"
    assert len(r.headers["x-request-id"]) == 32
    body = assert_problem(await shell.get("/v1/nowhere", headers={"X-Request-ID": "rid-1"}), 404)
    assert body["request_id"] == "rid-1"
    assert body["instance"] == "/v1/nowhere"


async def test_unknown_route_and_method_are_problems(shell: httpx.AsyncClient) -> None:
    assert_problem(await shell.get("/v1/no/such/route"), 404)
    assert_problem(await shell.patch("/v1/vms"), 405)


async def test_unknown_vm_is_404(shell: httpx.AsyncClient) -> None:
    for method, path, body in [
        ("GET", "/v1/vms/vm-nope", None),
        ("DELETE", "/v1/vms/vm-nope", None),
        ("GET", "/v1/vms/vm-nope/memslots", None),
        (
            "PUT",
            "/v1/vms/vm-nope/memslots/0",
            {"guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0},
        ),
        ("POST", "/v1/vms/vm-nope/vcpus", {"id": 1}),
        ("GET", "/v1/vms/vm-nope/stats", None),
        ("POST", "/v1/vms/vm-nope/snapshots", None),
    ]:
        r = await shell.request(method, path, json=body)
        prob = assert_problem(r, 404)
        assert "vm-nope" in prob["detail"]
        assert "errno" not in prob


async def test_vm_list_empty(shell: httpx.AsyncClient) -> None:
    r = await shell.get("/v1/vms")
    assert r.status_code == 200
    assert r.json() == {"items": [], "next_cursor": None}
    assert_problem(await shell.get("/v1/vms", params={"limit": 0}), 422)
    assert_problem(await shell.get("/v1/vms", params={"limit": 1001}), 422)


async def test_capabilities(shell: httpx.AsyncClient) -> None:
    r = await shell.get("/v1/capabilities")
    assert r.status_code == 200
    caps = r.json()
    assert caps["KVM_CAP_NR_MEMSLOTS"] == 32764
    # DEFAULT (0), SW_PROTECTED (1), TDX (5) on the simulated Intel host.
    assert caps["KVM_CAP_VM_TYPES"] == (1 << 0) | (1 << 1) | (1 << 5)
    assert caps["KVM_CAP_DISABLE_QUIRKS2"] == (1 << 11) - 1
    assert caps["KVM_CAP_MULTI_ADDRESS_SPACE"] == 2


# --- validation (422) ------------------------------------------------------------------


async def test_malformed_json_is_422(shell: httpx.AsyncClient) -> None:
    r = await shell.post(
        "/v1/vms", content=b"{not json", headers={"content-type": "application/json"}
    )
    body = assert_problem(r, 422)
    assert body["errors"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"vm_type": "KVM_X86_NO_SUCH_VM"}, "vm_type"),
        ({"vm_type": -1}, "vm_type"),
        ({"vm_type": 2**64}, "vm_type"),
        ({"vcpus": "0x1_0"}, "vcpus"),
        ({"vcpus": 1.5}, "vcpus"),
        ({"vcpus": True}, "vcpus"),
        ({"paging_levels": [4]}, "paging_levels"),
        ({"name": "x" * 201}, "name"),
        ({"bogus": 1}, "bogus"),
    ],
)
async def test_bad_vm_body_is_422_naming_the_field(
    shell: httpx.AsyncClient, payload: dict[str, Any], field: str
) -> None:
    body = assert_problem(await shell.post("/v1/vms", json=payload), 422)
    assert ["body", field] in [e["loc"][:2] for e in body["errors"]]
    assert "errno" not in body
    # Nothing was created.
    assert (await shell.get("/v1/vms")).json()["items"] == []


async def test_non_object_body_is_422(shell: httpx.AsyncClient) -> None:
    for payload in ([1, 2], "x", 5, None):
        assert_problem(await shell.post("/v1/vms", json=payload), 422)


async def test_path_ints_accept_hex_and_reject_garbage(shell: httpx.AsyncClient) -> None:
    # The VM does not exist: a well-formed slot gets as far as the 404.
    assert_problem(await shell.get("/v1/vms/vm-x/memslots/0x10001"), 404)
    body = assert_problem(await shell.get("/v1/vms/vm-x/memslots/0x100000000"), 422)
    assert body["errors"][0]["loc"] == ["path", "slot"]
    assert_problem(await shell.get("/v1/vms/vm-x/memslots/-1"), 422)
    assert_problem(await shell.get("/v1/vms/vm-x/translate", params={"gpa": "0xzz"}), 422)
    assert_problem(await shell.get("/v1/vms/vm-x/translate"), 422)


# --- body limit (413) ------------------------------------------------------------------


async def test_body_over_limit_by_content_length_is_413(make_client: Callable[..., Any]) -> None:
    client = await make_client(max_body_bytes=1024)
    payload = json.dumps({"name": "x" * 2000}).encode()
    r = await client.post("/v1/vms", content=payload, headers={"content-type": "application/json"})
    body = assert_problem(r, 413)
    assert "1024" in body["detail"]
    assert (await client.get("/v1/vms")).json()["items"] == []


async def test_chunked_body_over_limit_is_413(make_client: Callable[..., Any]) -> None:
    client = await make_client(max_body_bytes=1024)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(10):
            yield b"y" * 200
        yield b'"}'

    r = await client.post("/v1/vms", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413)
    assert (await client.get("/v1/vms")).json()["items"] == []


async def test_body_under_limit_passes(make_client: Callable[..., Any]) -> None:
    client = await make_client(max_body_bytes=1024)
    r = await client.post("/v1/vms", json={"vm_type": "bad name"})
    assert_problem(r, 422)  # reached validation: not refused for size


# --- errno → status, and the last-resort 500 -------------------------------------------


def test_errno_status_table() -> None:
    expected = {
        "EINVAL": 400,
        "EFAULT": 400,
        "E2BIG": 400,
        "EOPNOTSUPP": 400,
        "EBADF": 400,
        "EPERM": 403,
        "EACCES": 403,
        "ENOENT": 404,
        "ENXIO": 404,
        "EEXIST": 409,
        "EBUSY": 409,
        "ENOMEM": 507,
    }
    assert {errno_name(e): s for e, s in ERRNO_STATUS.items()} == expected
    assert errno_status(errno.EAGAIN) == 400


@pytest.mark.parametrize("err", sorted(ERRNO_STATUS))
async def test_kvm_error_becomes_problem_with_errno(
    make_client: Callable[..., Any], err: int
) -> None:
    client = await make_client()

    @client.app.get("/test/kvm-error")  # type: ignore[attr-defined]
    async def boom() -> None:
        raise KvmError(err, "a rule said no")

    body = assert_problem(await client.get("/test/kvm-error"), ERRNO_STATUS[err])
    assert body["errno"] == err
    assert body["errno_name"] == errno_name(err)
    assert body["errno_name"] != "ENOTSUP"  # the kernel's name for 95 is EOPNOTSUPP
    assert body["detail"] == "a rule said no"


async def test_unexpected_exception_is_logged_500_problem(
    make_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()

    @client.app.get("/test/crash")  # type: ignore[attr-defined]
    async def crash() -> None:
        raise RuntimeError("internal detail that must not leak")

    logger = logging.getLogger("vkmmu")
    logger.addHandler(caplog.handler)
    try:
        r = await client.get("/test/crash", headers={"X-Request-ID": "crash-1"})
    finally:
        logger.removeHandler(caplog.handler)
    body = assert_problem(r, 500)
    assert "internal detail" not in r.text
    assert body["request_id"] == "crash-1"
    assert r.headers["x-request-id"] == "crash-1"
    assert any(rec.exc_info and "internal detail" in str(rec.exc_info[1]) for rec in caplog.records)


# --- hostile input: never a 500 --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,  # nesting deeper than the JSON parser's recursion limit
        b'{"vcpus": ' + b"9" * 10_000 + b"}",  # more digits than int() converts
        b'{"vcpus": NaN}',
        b'{"vcpus": Infinity}',
        b'{"name": "\xff\xfe"}',  # not UTF-8
        b"\x00\x01\x02",
        b'{"name": "a", "name": 5}',
    ],
)
async def test_hostile_bodies_are_client_errors(shell: httpx.AsyncClient, raw: bytes) -> None:
    r = await shell.post("/v1/vms", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (await shell.get("/v1/vms")).json()["items"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/vms/vm%00x",
        "/v1/vms/" + "a" * 129,
        "/v1/vms/vm x/memslots",
        "/v1/vms?cursor=%00",
        "/v1/vms/vm-1/snapshots/snap%0a/restore",
    ],
)
async def test_malformed_ids_are_422(shell: httpx.AsyncClient, path: str) -> None:
    method = "POST" if path.endswith("restore") else "GET"
    assert_problem(await shell.request(method, path), 422)


async def test_control_characters_in_name_are_422(shell: httpx.AsyncClient) -> None:
    assert_problem(await shell.post("/v1/vms", json={"name": "a\x00b"}), 422)


# --- bodies the JSON reader cannot decode: 422 like any malformed body ----------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"name": "\xff\xfe"}', "UTF-8"),
        (b'{"vcpus": ' + b"9" * 5000 + b"}", "digits"),
        (b"[" * 50_000, "nests"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nests"),
    ],
)
async def test_undecodable_bodies_are_422_with_the_field_list(
    shell: httpx.AsyncClient, raw: bytes, why: str
) -> None:
    r = await shell.post("/v1/vms", content=raw, headers={"content-type": "application/json"})
    body = assert_problem(r, 422)
    assert body["type"] == "urn:vkmmu:problem:validation"
    assert body["errors"] and body["errors"][0]["loc"] == ["body"]
    assert body["errors"][0]["type"] == "json_invalid"
    assert why in body["errors"][0]["msg"]
    assert (await shell.get("/v1/vms")).json()["items"] == []


# --- 413 and 405 say the same thing whichever way they are reached --------------------------


async def test_413_title_is_the_same_for_declared_and_chunked_bodies(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(max_body_bytes=1024)
    declared = await client.post(
        "/v1/vms",
        content=json.dumps({"name": "x" * 2000}).encode(),
        headers={"content-type": "application/json"},
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(10):
            yield b"y" * 200
        yield b'"}'

    chunked = await client.post(
        "/v1/vms", content=chunks(), headers={"content-type": "application/json"}
    )
    titles = {assert_problem(r, 413)["title"] for r in (declared, chunked)}
    assert titles == {"Content Too Large"}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/v1/vms", {"GET", "POST"}),
        ("PUT", "/v1/vms/vm-x", {"GET", "DELETE"}),
        ("POST", "/v1/vms/vm-x/memslots/0", {"GET", "PUT", "DELETE"}),
    ],
)
async def test_405_allow_lists_every_method(
    shell: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    r = await shell.request(method, path)
    assert_problem(r, 405)
    assert {m.strip() for m in r.headers["allow"].split(",")} == allowed


# --- cursors: malformed is 422 naming query.cursor, on every list ---------------------------

LISTS = (
    "/v1/vms",
    "/v1/vms/{vm}/vcpus",
    "/v1/vms/{vm}/memslots",
    "/v1/vms/{vm}/guest-memfds",
    "/v1/vms/{vm}/memory-attributes",
    "/v1/vms/{vm}/zaps",
    "/v1/vms/{vm}/mappings",
    "/v1/vms/{vm}/roots",
    "/v1/vms/{vm}/snapshots",
)


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("populated", [False, True])
async def test_malformed_cursor_is_422_on_every_list(
    shell: httpx.AsyncClient, path: str, populated: bool
) -> None:
    vm = (await shell.post("/v1/vms", json={"vm_type": "KVM_X86_SW_PROTECTED_VM"})).json()["id"]
    if populated:
        slot = {"guest_phys_addr": 0, "memory_size": 1 << 20, "userspace_addr": 0x7F00_0000_0000}
        assert (await shell.put(f"/v1/vms/{vm}/memslots/0", json=slot)).status_code == 200
        for call, body in (
            ("vcpus/0/accesses", {"gpa": 0, "size": 8192}),
            ("zaps", {"scope": "all", "roots": "shared"}),
            ("vcpus/0/accesses", {"gpa": 0}),
            ("guest-memfds", {"size": 1 << 20}),
            ("memory-attributes", {"address": 0x80000, "size": 4096, "attributes": 8}),
            ("snapshots", None),
        ):
            r = await shell.post(f"/v1/vms/{vm}/{call}", json=body)
            assert r.status_code in (200, 201), r.text
        assert (await shell.get(path.format(vm=vm))).json()["items"]
    for cursor in ("zz", "-1", "1.5", "vm-", "snap-xyz", "0x", "9" * 30):
        r = await shell.get(path.format(vm=vm), params={"cursor": cursor})
        body = assert_problem(r, 422)
        assert ["query", "cursor"] in [e["loc"] for e in body["errors"]], (cursor, body)


async def test_cursors_returned_are_accepted(shell: httpx.AsyncClient) -> None:
    ids = sorted([(await shell.post("/v1/vms", json={})).json()["id"] for _ in range(3)])
    page = (await shell.get("/v1/vms", params={"limit": 1})).json()
    assert page["next_cursor"] == ids[0]
    page = (await shell.get("/v1/vms", params={"limit": 1, "cursor": ids[0]})).json()
    assert [v["id"] for v in page["items"]] == [ids[1]]


# --- a database outage is 503 + Retry-After, never 500 -------------------------------------


async def test_database_outage_is_503_with_retry_after(
    make_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    from app.db.session import Database

    client = await make_client()
    service = client.app.state.service  # type: ignore[attr-defined]
    vm = (await client.post("/v1/vms", json={})).json()["id"]
    working = service._db
    # Nothing listens on port 1: every connection is refused.
    down = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
    service._db = down
    try:
        calls = [
            ("GET", "/v1/vms", None),
            ("POST", "/v1/vms", {}),
            ("GET", f"/v1/vms/{vm}", None),
            ("GET", f"/v1/vms/{vm}/stats", None),
            ("POST", f"/v1/vms/{vm}/vcpus", {"id": 3}),
            ("DELETE", f"/v1/vms/{vm}", None),
            ("POST", f"/v1/vms/{vm}/snapshots", None),
            ("GET", "/metrics", None),
        ]
        with caplog.at_level(logging.WARNING):
            for method, path, body in calls:
                r = await client.request(method, path, json=body)
                problem = assert_problem(r, 503)
                assert r.headers["retry-after"] == "1", path
                assert "127.0.0.1" not in problem["detail"]
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    finally:
        service._db = working
        down.dispose()
    # Back up: nothing happened meanwhile, and the VM works.
    r = await client.post(f"/v1/vms/{vm}/vcpus", json={"id": 3})
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"1"'
