"""The OpenAPI spec: checked in, complete against the contract, errors published per route."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.api.errors import PROBLEM_JSON
from app.api.openapi_names import OPERATION_IDS
from app.main import create_app
from app.openapi_dump import render

SPEC_FILE = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"

# Every call of ../shared/spec/api-contract.md (paths and methods are a contract).
CONTRACT = {
    ("get", "/v1/capabilities"),
    ("post", "/v1/vms"),
    ("get", "/v1/vms"),
    ("get", "/v1/vms/{vm}"),
    ("delete", "/v1/vms/{vm}"),
    ("get", "/v1/vms/{vm}/capabilities"),
    ("post", "/v1/vms/{vm}/enable-cap"),
    ("get", "/v1/vms/{vm}/quirks"),
    ("post", "/v1/vms/{vm}/vcpus"),
    ("put", "/v1/vms/{vm}/memslots/{slot}"),
    ("delete", "/v1/vms/{vm}/memslots/{slot}"),
    ("get", "/v1/vms/{vm}/memslots"),
    ("get", "/v1/vms/{vm}/memslots/{slot}"),
    ("get", "/v1/vms/{vm}/memslots/{slot}/dirty-log"),
    ("post", "/v1/vms/{vm}/memslots/{slot}/dirty-log/clear"),
    ("post", "/v1/vms/{vm}/guest-memfds"),
    ("post", "/v1/vms/{vm}/guest-memfds/{fd}/fallocate"),
    ("delete", "/v1/vms/{vm}/guest-memfds/{fd}"),
    ("post", "/v1/vms/{vm}/guest-memfds/{fd}/read"),
    ("post", "/v1/vms/{vm}/guest-memfds/{fd}/write"),
    ("post", "/v1/vms/{vm}/memory-attributes"),
    ("get", "/v1/vms/{vm}/memory-attributes"),
    ("post", "/v1/vms/{vm}/vcpus/{vcpu}/accesses"),
    ("post", "/v1/vms/{vm}/vcpus/{vcpu}/load"),
    ("post", "/v1/vms/{vm}/vcpus/{vcpu}/store"),
    ("post", "/v1/vms/{vm}/vcpus/{vcpu}/pre-fault"),
    ("post", "/v1/vms/{vm}/vcpus/{vcpu}/accept"),
    ("post", "/v1/vms/{vm}/host-memory/read"),
    ("post", "/v1/vms/{vm}/host-memory/write"),
    ("post", "/v1/vms/{vm}/host-memory/discard"),
    ("post", "/v1/vms/{vm}/host-memory/advise"),
    ("post", "/v1/vms/{vm}/host-memory/map"),
    ("post", "/v1/vms/{vm}/zaps"),
    ("get", "/v1/vms/{vm}/zaps"),
    ("get", "/v1/vms/{vm}/translate"),
    ("get", "/v1/vms/{vm}/mappings"),
    ("get", "/v1/vms/{vm}/roots"),
    ("get", "/v1/vms/{vm}/stats"),
    ("get", "/v1/vms/{vm}/audit"),
    ("post", "/v1/vms/{vm}/snapshots"),
    ("get", "/v1/vms/{vm}/snapshots"),
    ("post", "/v1/vms/{vm}/snapshots/{snapshot}/restore"),
    ("get", "/metrics"),
    ("get", "/healthz"),
    ("get", "/readyz"),
}


def operations() -> list[tuple[str, str, dict[str, object]]]:
    spec = create_app().openapi()
    return [(m, p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def test_checked_in_spec_is_current() -> None:
    assert SPEC_FILE.exists(), "run `make openapi`"
    assert SPEC_FILE.read_text(encoding="utf-8") == render(), (
        "openapi/openapi.json differs from create_app().openapi(): run `make openapi`"
    )


def test_every_contract_route_exists() -> None:
    have = {(m, p) for m, p, _ in operations()}
    assert CONTRACT - have == set()
    assert ("post", "/v1/vms/{vm}/zap-policy") in have


def test_operation_ids_come_from_the_table() -> None:
    # Every route is named in OPERATION_IDS: SDK method names never fall back to a guess.
    for method, path, op in operations():
        assert op["operationId"] in OPERATION_IDS.values(), f"{method} {path}"


def test_v1_routes_publish_problem_bodies() -> None:
    for method, path, op in operations():
        if not path.startswith("/v1/"):
            continue
        responses = op["responses"]
        assert isinstance(responses, dict)
        errors = {code for code in responses if code[0] in "45"}
        assert {"422", "500"} <= errors, (method, path)
        if "{vm}" in path:
            assert "404" in errors, (method, path)
        for code in errors:
            content = responses[code]["content"]
            assert list(content) == [PROBLEM_JSON], (method, path, code)
            assert content[PROBLEM_JSON]["schema"] == {"$ref": "#/components/schemas/Problem"}


def test_kvm_calls_publish_their_errno_statuses() -> None:
    for method, path, op in operations():
        if method in ("post", "put", "delete") and "/vms/{vm}/" in path and "snapshots" not in path:
            assert {"400", "403", "409", "507"} <= set(op["responses"]), (method, path)
            if not path.endswith("/read"):  # reads by POST are queries: no If-Match
                assert "412" in op["responses"], (method, path)


# Routes about one VM whose answer carries no ETag: the VM is gone, a list of snapshots
# (history, not state), an event stream.
NO_ETAG = {
    ("delete", "/v1/vms/{vm}"),
    ("get", "/v1/vms/{vm}/snapshots"),
    ("get", "/v1/vms/{vm}/zaps/stream"),
}


def test_vm_routes_declare_their_etag_header() -> None:
    for method, path, op in operations():
        if not (path.startswith("/v1/vms/{vm}") or (method, path) == ("post", "/v1/vms")):
            continue
        responses = op["responses"]
        assert isinstance(responses, dict)
        success = [code for code in responses if code[0] == "2"]
        assert len(success) == 1, (method, path, success)
        headers = responses[success[0]].get("headers", {})
        assert ("ETag" in headers) is ((method, path) not in NO_ETAG), (method, path)
        if "412" in responses:
            assert "ETag" in responses["412"]["headers"], (method, path)


def test_zap_policy_says_it_is_not_kvm() -> None:
    op = dict((p, o) for m, p, o in operations() if m == "post")["/v1/vms/{vm}/zap-policy"]
    text = json.dumps(op)
    assert "NOT KVM" in text
    assert "This is not KVM" in text


def test_operation_ids_are_resource_verb() -> None:
    ids = [op["operationId"] for _, _, op in operations()]
    assert len(ids) == len(set(ids))
    for op_id in ids:
        assert re.fullmatch(r"[a-z]+(_[a-z0-9]+)+", op_id), op_id
    assert {"vms_create", "memslots_set", "zaps_list", "stats_get"} <= set(ids)


def test_schema_names_have_no_generator_suffixes() -> None:
    names = create_app().openapi()["components"]["schemas"]
    for name in names:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", name), name
        assert "Response" not in name, name
    assert "VmInfoPage" in names and "ZapEvent" in names


def test_u64_bounds_are_exact_integers() -> None:
    text = SPEC_FILE.read_text(encoding="utf-8")
    assert "e+19" not in text and '"maximum": 18446744073709551615' in text
    spec = json.loads(text)
    region = spec["components"]["schemas"]["MemoryRegion"]["properties"]["memory_size"]
    assert region["anyOf"][0]["maximum"] == 2**64 - 1
    assert sorted(spec["components"]["schemas"]["MemoryRegion"]["required"]) == [
        "guest_phys_addr",
        "memory_size",
        "userspace_addr",
    ]
