"""What the schemathesis tests share (test_schemathesis.py: the open service;
test_schemathesis_tokens.py: tokens on): the schema's configuration, the live resources each
case runs on, the seeded calls, the 2xx count per operation and its floor.

Every case, generated or seeded, is judged by all of schemathesis' default checks: no 5xx, a
status code the operation documents, the documented content type and headers, the body valid
against its schema, schema-violating input rejected, schema-valid input not answered 422, and
(tokens on) a call without a token or with a wrong one refused.

Every case runs on live resources made for it alone: a fresh VM (a default VM or a TD, in
turn) with memslot 0 mapped and vCPU 0 in the guest, plus a guest_memfd, a snapshot and a
token when the operation names them; the path parameters of the case are pointed at them, and
the VM is deleted after the case. So a generated `DELETE /v1/vms/{vm}` removes only its own
VM, and every call lands on something that exists instead of stopping at 404.

Generated bodies rarely satisfy KVM's rules (alignment, ranges, a TD in the right lifecycle
state), so the operations whose generated calls do not reach a 2xx also get one seeded call
(SEEDS): a valid body on resources prepared for it, judged by the same checks. The report
counts generated and seeded 2xx apart.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.generation.meta import negated_parameters
from schemathesis.specs.openapi.checks import positive_data_acceptance

MiB = 1 << 20
HVA = 0x7F00_0000_0000
SRC = 0x5000_0000  # host memory a TD's initial pages are copied from
EXAMPLES = 3  # generated calls per operation (the fuzzing phase; explicit examples run too)
STREAM_SECONDS = 0.2  # the event streams end after this (they never end by themselves)
FLOOR = 1  # 2xx answers every operation that can succeed must reach

# A schema-valid request may still be one KVM rejects (an errno: 400, 403 EPERM, 409; a
# budget or quota: 507), or carry a generated If-Match that names no version (412), or be
# too large (413; 431 for the request line and headers): those answers are the contract,
# not a failure to accept valid data. 422 (the request's shape) stays out: schema-valid
# input must never get it.
POSITIVE_STATUSES = ["2xx", "400", "403", "404", "409", "412", "413", "431", "507"]
# Schema-violating input must be refused: schemathesis' list, plus the refusals of a body or
# a request line too large (413, 431), which come before the shape is even read.
NEGATIVE_STATUSES = [
    *("400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"),
    *("431", "5xx"),
]


def fuzz_schema(app: FastAPI) -> Any:
    """The app's own spec, set up for a bounded, repeatable run."""
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = app
    schema.config.seed = 0
    schema.config.checks.positive_data_acceptance.expected_statuses = POSITIVE_STATUSES
    schema.config.checks.negative_data_rejection.expected_statuses = NEGATIVE_STATUSES
    # 507 is ENOMEM: a budget of the service or a quota of the tenant reached, documented
    # on every route that can reach one; not a crash. Every other 5xx still fails.
    schema.config.checks.not_a_server_error.expected_statuses = ["2xx", "3xx", "4xx", "507"]
    # Bounded: explicit examples and the fuzzing phase (the coverage phase alone makes dozens
    # of calls per operation; the stateful phase is replaced by the live resources per case).
    schema.config.phases.coverage.enabled = False
    schema.config.phases.stateful.enabled = False
    return schema


def with_token(schema: Any, caller: Caller) -> Callable[[Any], Any]:
    """A test decorator: generated cases carry `caller`'s token, through schemathesis' auth
    hook, which leaves it out of the negative cases that test a missing token (and so checks
    that those are refused). Read at each case (no caching): the token routes take the
    admin's token, the others the tenant's."""

    class _Token:
        def get(self, case: schemathesis.Case, ctx: Any) -> dict[str, str] | None:
            return caller.headers_for(case.operation.path) or None

        def set(self, case: schemathesis.Case, data: dict[str, str], ctx: Any) -> None:
            case.headers = {**(case.headers or {}), **data}

    return schema.auth(_Token, refresh_interval=None)  # type: ignore[no-any-return]


def fuzz_settings(examples: int = EXAMPLES) -> Any:
    """The Hypothesis settings of both runs: derandomised, no example database, no deadline."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def label(case: schemathesis.Case) -> str:
    return f"{case.operation.method.upper()} {case.operation.path}"


def _ok(r: Any, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.text[:500]}"
    return r.json()


@dataclass
class Caller:
    """Who makes the calls: `head` (a tenant's token, or nothing when the service is open)
    for the VM routes, `admin` for the token routes."""

    client: Any
    head: dict[str, str] = field(default_factory=dict)
    admin: dict[str, str] = field(default_factory=dict)

    def post(self, path: str, body: Any = None, status: int = 200) -> Any:
        return _ok(self.client.post(path, json=body, headers=self.head), status)

    def put(self, path: str, body: Any) -> Any:
        return _ok(self.client.put(path, json=body, headers=self.head))

    def headers_for(self, path: str) -> dict[str, str]:
        return self.admin if path.startswith("/v1/tokens") else self.head


SLOT0 = {"guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": HVA}


def live(caller: Caller, path: str, td: bool, needs: set[str]) -> dict[str, str]:
    """A VM with a slot and a running vCPU, plus a guest_memfd, a snapshot and a token when
    the case names them: what a case's path parameters point at. Slot 0 logs dirty pages when
    the operation is about the dirty log."""
    out: dict[str, str] = {}
    if "token" in needs:
        r = caller.client.post("/v1/tokens", json={"tenant": "fuzz"}, headers=caller.admin)
        out["token"] = _ok(r, 201)["id"]
    if "vm" not in needs:
        return out
    kind = "KVM_X86_TDX_VM" if td else "KVM_X86_DEFAULT_VM"
    vm = caller.post("/v1/vms", {"vm_type": kind, "vcpus": 2}, 201)["id"]
    base = f"/v1/vms/{vm}"
    out |= {"vm": vm, "slot": "0", "vcpu": "0"}
    if "fd" in needs:
        # MMAP | INIT_SHARED where the VM type allows it (read and write need shared memory).
        gmem = {"size": 2 * MiB, "flags": 1 if td else 3}
        out["fd"] = str(caller.post(f"{base}/guest-memfds", gmem, 201)["fd"])
    slot = {**SLOT0, "flags": 1} if "/dirty-log" in path else SLOT0
    caller.put(f"{base}/memslots/0", slot)
    caller.post(f"{base}/vcpus/0/accesses", {"gpa": 0, "size": 64 * 1024, "access": "write"})
    if "snapshot" in needs:
        out["snapshot"] = caller.post(f"{base}/snapshots", {}, 201)["id"]
    return out


def cleanup(caller: Caller, resources: dict[str, str]) -> None:
    """The case's VM goes (a tenant's VM quota stays free; memory stays bounded)."""
    if "vm" in resources:
        caller.client.delete(f"/v1/vms/{resources['vm']}", headers=caller.head)


# --- seeded calls ---------------------------------------------------------------------
# Each: prepares what the call needs on the case's fresh VM and gives the call's path
# parameters, query and body. The call itself goes through schemathesis with every check.

Seed = Callable[[Caller, dict[str, str]], tuple[dict[str, str], dict[str, Any] | None, Any]]


def _td(caller: Caller, lifecycle: bool) -> str:
    body: dict[str, Any] = {"vm_type": "KVM_X86_TDX_VM", "vcpus": 0 if lifecycle else 1}
    if lifecycle:
        body["td_lifecycle"] = True
    return str(caller.post("/v1/vms", body, 201)["id"])


def _private_slot(caller: Caller, vm: str) -> None:
    fd = caller.post(f"/v1/vms/{vm}/guest-memfds", {"size": 2 * MiB}, 201)["fd"]
    region = {**SLOT0, "flags": ["KVM_MEM_GUEST_MEMFD"], "guest_memfd": fd}
    caller.put(f"/v1/vms/{vm}/memslots/0", {**region, "guest_memfd_offset": 0})
    attrs = {"address": 0, "size": 2 * MiB, "attributes": ["KVM_MEMORY_ATTRIBUTE_PRIVATE"]}
    caller.post(f"/v1/vms/{vm}/memory-attributes", attrs)


def _initialised_td(caller: Caller) -> str:
    """A lifecycle TD after KVM_TDX_INIT_VM and INIT_VCPU, with a private slot (as
    tests/api/test_tdx_lifecycle.py builds it)."""
    vm = _td(caller, lifecycle=True)
    caller.post(f"/v1/vms/{vm}/tdx/init", {"attributes": 1 << 28})
    caller.post(f"/v1/vms/{vm}/vcpus", {"id": 0}, 201)
    caller.post(f"/v1/vms/{vm}/vcpus/0/tdx/init", {})
    _private_slot(caller, vm)
    return vm


def _seed_tdx_init(caller: Caller, r: dict[str, str]) -> Any:
    return {"vm": _td(caller, lifecycle=True)}, None, {"attributes": 1 << 28}


def _seed_vcpu_tdx_init(caller: Caller, r: dict[str, str]) -> Any:
    vm = _td(caller, lifecycle=True)
    caller.post(f"/v1/vms/{vm}/tdx/init", {"attributes": 1 << 28})
    caller.post(f"/v1/vms/{vm}/vcpus", {"id": 0}, 201)
    return {"vm": vm, "vcpu": "0"}, None, {}


def _seed_init_mem_region(caller: Caller, r: dict[str, str]) -> Any:
    vm = _initialised_td(caller)
    caller.post(f"/v1/vms/{vm}/host-memory/write", {"userspace_addr": SRC, "data": "5eed"})
    body = {"source_addr": SRC, "gpa": 0, "nr_pages": 1, "flags": 1}
    return {"vm": vm, "vcpu": "0"}, None, body


def _seed_finalize(caller: Caller, r: dict[str, str]) -> Any:
    return {"vm": _initialised_td(caller)}, None, None


def _seed_accept(caller: Caller, r: dict[str, str]) -> Any:
    vm = _td(caller, lifecycle=False)
    _private_slot(caller, vm)
    return {"vm": vm, "vcpu": "0"}, None, {"gpa": 0x5000}


def _hypercall_td(caller: Caller) -> str:
    vm = _td(caller, lifecycle=False)
    cap = {"cap": "KVM_CAP_EXIT_HYPERCALL", "flags": 0, "args": [1 << 12]}
    caller.post(f"/v1/vms/{vm}/enable-cap", cap)
    return vm


def _seed_map_gpa(caller: Caller, r: dict[str, str]) -> Any:
    return {"vm": _hypercall_td(caller), "vcpu": "0"}, None, {"gpa": 0, "size": 2 * MiB}


def _seed_hypercall_complete(caller: Caller, r: dict[str, str]) -> Any:
    vm = _hypercall_td(caller)
    caller.post(f"/v1/vms/{vm}/vcpus/0/tdvmcall/map-gpa", {"gpa": 0, "size": 2 * MiB})
    return {"vm": vm, "vcpu": "0"}, None, {"ret": 0}


def _on_live(body: Any, query: dict[str, Any] | None = None) -> Seed:
    return lambda caller, r: (r, query, body)


_ONES = base64.b64encode(b"\xff" * 8).decode()
SEEDS: dict[str, Seed] = {
    "POST /v1/vms/{vm}/enable-cap": _on_live(
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "flags": 0, "args": [0, 0, 0, 0]}
    ),
    "POST /v1/vms/{vm}/guest-memfds": _on_live({"size": 2 * MiB, "flags": 0}),
    "POST /v1/vms/{vm}/guest-memfds/{fd}/fallocate": _on_live(
        {"mode": "allocate", "offset": 0, "len": 4096}
    ),
    "POST /v1/vms/{vm}/guest-memfds/{fd}/read": _on_live({"offset": 0, "len": 16}),
    "POST /v1/vms/{vm}/guest-memfds/{fd}/write": _on_live({"offset": 0, "data": "abcd"}),
    "POST /v1/vms/{vm}/host-memory/advise": _on_live(
        {"userspace_addr": HVA, "len": 2 * MiB, "advice": "hugepage"}
    ),
    "POST /v1/vms/{vm}/host-memory/discard": _on_live({"userspace_addr": HVA, "len": 4096}),
    "POST /v1/vms/{vm}/host-memory/map": _on_live(
        {"userspace_addr": HVA, "len": 2 * MiB, "page_size": 4096}
    ),
    "POST /v1/vms/{vm}/memory-attributes": _on_live(
        {"address": 0, "size": 4096, "attributes": 0, "flags": 0}
    ),
    "POST /v1/vms/{vm}/vcpus/{vcpu}/pre-fault": _on_live({"gpa": MiB, "size": 8192}),
    "POST /v1/vms/{vm}/vcpus/{vcpu}/store": _on_live({"gpa": 0, "data": "ab"}),
    "POST /v1/vms/{vm}/vcpus/{vcpu}/accept": _seed_accept,
    "POST /v1/vms/{vm}/vcpus/{vcpu}/hypercall/complete": _seed_hypercall_complete,
    "POST /v1/vms/{vm}/vcpus/{vcpu}/tdvmcall/map-gpa": _seed_map_gpa,
    "POST /v1/vms/{vm}/tdx/init": _seed_tdx_init,
    "POST /v1/vms/{vm}/tdx/finalize": _seed_finalize,
    "POST /v1/vms/{vm}/vcpus/{vcpu}/tdx/init": _seed_vcpu_tdx_init,
    "POST /v1/vms/{vm}/vcpus/{vcpu}/tdx/init-mem-region": _seed_init_mem_region,
    "POST /v1/vms/{vm}/what-if": _on_live(
        {"ops": [{"op": "delete_memslot", "slot": 0}], "variants": [{"name": "x"}]}
    ),
    "GET /v1/vms/{vm}/memslots/{slot}/dirty-log": _on_live(None),
    "POST /v1/vms/{vm}/memslots/{slot}/dirty-log/clear": _on_live(
        {"first_page": 0, "num_pages": 64, "bitmap": _ONES}
    ),
    "PUT /v1/vms/{vm}/memslots/{slot}": lambda caller, r: (
        {**r, "slot": "1"},
        None,
        {"guest_phys_addr": 4 * MiB, "memory_size": 2 * MiB, "userspace_addr": HVA + 4 * MiB},
    ),
    "GET /v1/tokens/{token}": _on_live(None),
    "DELETE /v1/tokens/{token}": _on_live(None),
}


# Why generated calls of an operation may not reach a 2xx in EXAMPLES tries (the report
# lists each such operation with its reason; its seeded call reaches one).
_TD_STATE = "valid only on a TD in the right lifecycle state"
WHY_SEEDED: dict[str, str] = {
    "POST /v1/vms/{vm}/vcpus/{vcpu}/accept": "needs a TD's pending private page",
    "POST /v1/vms/{vm}/vcpus/{vcpu}/hypercall/complete": "needs a pending MapGPA exit",
    "POST /v1/vms/{vm}/vcpus/{vcpu}/tdvmcall/map-gpa": "needs KVM_CAP_EXIT_HYPERCALL on a TD",
    "POST /v1/vms/{vm}/tdx/init": _TD_STATE,
    "POST /v1/vms/{vm}/tdx/finalize": _TD_STATE,
    "POST /v1/vms/{vm}/vcpus/{vcpu}/tdx/init": _TD_STATE,
    "POST /v1/vms/{vm}/vcpus/{vcpu}/tdx/init-mem-region": _TD_STATE,
    "POST /v1/vms/{vm}/enable-cap": "generated cap numbers name no supported capability",
    "PUT /v1/vms/{vm}/memslots/{slot}": "generated regions overlap slot 0 or name another slot",
    "POST /v1/vms/{vm}/what-if": "generated ops name no journal operation",
}
_KVM_RULES = "generated bodies fail KVM's rules (alignment, sizes, ranges, flags)"


# A check left out for one operation, with the reason: rules a JSON schema cannot state.
EXCLUDED: dict[str, list[Any]] = {
    # `ops` are journal operations whose fields depend on their `op` (free-form objects in
    # the schema), and a what-if's rules span fields (unique variant names; ops or a trace):
    # a body valid against the schema may still be "Bad what-if" (422).
    "POST /v1/vms/{vm}/what-if": [positive_data_acceptance],
    # The body's optional `slot` must equal the path's (422 "Slot mismatch"): a rule between
    # a path parameter and a body field.
    "PUT /v1/vms/{vm}/memslots/{slot}": [positive_data_acceptance],
    # `expires_at` must be in the future (422): a rule of the clock.
    "POST /v1/tokens": [positive_data_acceptance],
}


# --- counting ---------------------------------------------------------------------------


@dataclass
class Tally:
    """Calls and 2xx answers per operation, generated and seeded apart."""

    calls: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    seeded_ok: Counter[str] = field(default_factory=Counter)
    order: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)

    def record(self, op: str, status: int, *, seeded: bool, text: str = "") -> None:
        if seeded:
            self.seeded_ok[op] += 200 <= status < 300
            assert 200 <= status < 300, f"the seeded call of {op} answered {status}: {text}"
            return
        self.calls[op] += 1
        self.ok[op] += 200 <= status < 300
        self.statuses[status] += 1

    def report(self, operations: set[str]) -> str:
        rows = [
            f"{self.ok[op]:3d}/{self.calls[op]:<3d} +{self.seeded_ok[op]} seeded  {op}"
            for op in sorted(operations)
        ]
        missed = [
            f"  {op}: {WHY_SEEDED.get(op, _KVM_RULES)}"
            for op in sorted(operations)
            if not self.ok[op] and self.seeded_ok[op]
        ]
        total = sum(self.calls.values())
        reached = sum(1 for op in operations if self.ok[op])
        return "\n".join(
            [
                f"{total} generated calls, {sum(self.ok.values())} answered 2xx; "
                f"{reached}/{len(operations)} operations reached a 2xx by generated calls, "
                f"{sum(1 for op in operations if self.ok[op] + self.seeded_ok[op])} in all; "
                f"statuses: {dict(sorted(self.statuses.items()))}",
                *rows,
                "reached a 2xx only by the seeded call:",
                *missed,
            ]
        )


def _missing_token(case: schemathesis.Case, caller: Caller) -> dict[str, str] | None:
    """The caller's token for a case the auth hook did not reach (the explicit examples of
    the spec), unless the case leaves the token out on purpose (a negative case)."""
    head = caller.headers_for(case.operation.path)
    if not head or (case.headers or {}).get("Authorization") == head["Authorization"]:
        return None
    if any(name.lower() == "authorization" for name, _ in negated_parameters(case.meta)):
        return None
    return head


def run_case(
    case: schemathesis.Case,
    caller: Caller,
    tally: Tally,
    excluded: dict[str, list[Any]],
) -> None:
    """A generated case on its own live resources, every default check."""
    op = label(case)
    tally.order[op] += 1
    params = case.path_parameters or {}
    td = tally.order[op] % 2 == 0
    resources = live(caller, case.operation.path, td, set(params))
    try:
        for name in params:
            if name in resources:
                params[name] = resources[name]
        if case.operation.path.endswith(("/events", "/stream")):
            case.query = {**(case.query or {}), "timeout": STREAM_SECONDS}
        response = case.call_and_validate(
            headers=_missing_token(case, caller), excluded_checks=excluded.get(op)
        )
        tally.record(op, response.status_code, seeded=False)
    finally:
        cleanup(caller, resources)


def run_seed(
    schema: Any, op: str, caller: Caller, tally: Tally, excluded: dict[str, list[Any]]
) -> None:
    """The seeded call of `op` on resources prepared for it: every default check, and a 2xx."""
    method, path = op.split(" ", 1)
    operation = schema[path][method]
    names = set(re.findall(r"{(\w+)}", path))
    resources = live(caller, path, False, names)
    params: dict[str, str] = {}
    try:
        params, query, body = SEEDS[op](caller, resources)
        kwargs: dict[str, Any] = {"path_parameters": params}
        if query is not None:
            kwargs["query"] = query
        if body is not None:
            kwargs["body"] = body
            kwargs["media_type"] = "application/json"
        seeded = operation.Case(**kwargs)
        # The caller's token as an explicit header: schemathesis then also checks that the
        # call without it, or with a wrong one, is refused.
        head = caller.headers_for(path) or None
        response = seeded.call_and_validate(headers=head, excluded_checks=excluded.get(op))
        tally.record(op, response.status_code, seeded=True, text=response.text[:500])
    finally:
        cleanup(caller, resources)
        if params.get("vm") != resources.get("vm"):
            cleanup(caller, params)


def check_floor(schema: Any, tally: Tally, not_reached: dict[str, str]) -> str:
    """Every operation reached a 2xx (generated or seeded) at least FLOOR times, except the
    ones `not_reached` lists with the reason; returns the report."""
    operations = {
        f"{op.method.upper()} {op.path}" for op in (r.ok() for r in schema.get_all_operations())
    }
    missing = operations - set(tally.calls)
    assert not missing, f"operations whose generated cases did not run: {sorted(missing)}"
    report = tally.report(operations)
    stale = set(not_reached) - operations
    assert not stale, f"NOT_REACHED names operations the spec no longer has: {stale}"
    below = [
        op
        for op in sorted(operations - set(not_reached))
        if tally.ok[op] + tally.seeded_ok[op] < FLOOR
    ]
    assert not below, f"never reached a 2xx:\n{report}\nbelow the floor: {below}"
    lifted = [op for op in not_reached if tally.ok[op] + tally.seeded_ok[op]]
    assert not lifted, f"listed in NOT_REACHED but reached a 2xx (remove them): {lifted}"
    return report
