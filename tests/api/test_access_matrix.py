"""Every route of the spec × {no token, wrong token, other tenant, read-only, owner, admin}:
each answers a status its operation documents, the one the security model gives it, and no
answer to one tenant ever holds another tenant's ids (bodies and event streams alike).

The routes come from the app's own OpenAPI spec: a new route is walked without editing this
file (its body defaults to `{}`, which its documented 422 covers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from app.api.auth import READ_ONLY_POSTS
from tests.api.auth_helpers import ADMIN, bearer, issue, secured
from tests.api.helpers import HVA, MiB

WHO = ("none", "wrong", "other", "read_only", "owner", "admin")
OPEN = {"/healthz", "/readyz"}
STREAMS = {"/v1/events", "/v1/vms/{vm}/events", "/v1/vms/{vm}/zaps/stream"}
# Bodies that make the call succeed on a fresh VM (anything else: `{}`).
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/vms/{vm}/enable-cap"): {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [0, 0, 0, 0]},
    ("POST", "/v1/vms/{vm}/vcpus"): {"id": 7},
    ("POST", "/v1/vms/{vm}/vcpus/{vcpu}/smm"): {"smm": False},
    ("PUT", "/v1/vms/{vm}/memslots/{slot}"): {
        "guest_phys_addr": 0, "memory_size": 2 * MiB, "userspace_addr": HVA,
    },
    ("POST", "/v1/vms/{vm}/guest-memfds"): {"size": 2 * MiB},
    ("POST", "/v1/vms/{vm}/guest-memfds/{fd}/fallocate"): {
        "mode": "allocate", "offset": 0, "len": 4096,
    },
    ("POST", "/v1/vms/{vm}/guest-memfds/{fd}/read"): {"offset": 0, "len": 1},
    ("POST", "/v1/vms/{vm}/guest-memfds/{fd}/write"): {"offset": 0, "data": "ab"},
    ("POST", "/v1/vms/{vm}/memory-attributes"): {"address": 0, "size": 4096, "attributes": 0},
    ("POST", "/v1/vms/{vm}/vcpus/{vcpu}/accesses"): {"gpa": 0, "size": 8192, "access": "write"},
    ("POST", "/v1/vms/{vm}/vcpus/{vcpu}/load"): {"gpa": 0, "len": 1},
    ("POST", "/v1/vms/{vm}/vcpus/{vcpu}/store"): {"gpa": 0, "data": "ab"},
    ("POST", "/v1/vms/{vm}/vcpus/{vcpu}/pre-fault"): {"gpa": 0, "size": 4096},
    ("POST", "/v1/vms/{vm}/host-memory/read"): {"userspace_addr": HVA, "len": 1},
    ("POST", "/v1/vms/{vm}/host-memory/write"): {"userspace_addr": HVA, "data": "ab"},
    ("POST", "/v1/vms/{vm}/host-memory/discard"): {"userspace_addr": HVA, "len": 4096},
    ("POST", "/v1/vms/{vm}/host-memory/advise"): {
        "userspace_addr": HVA, "len": 2 * MiB, "advice": "hugepage",
    },
    ("POST", "/v1/vms/{vm}/host-memory/map"): {
        "userspace_addr": HVA, "len": 2 * MiB, "page_size": 4096,
    },
    ("POST", "/v1/vms/{vm}/zaps"): {"scope": "all", "roots": "shared"},
    ("POST", "/v1/vms/{vm}/zap-policy"): {"policy": "kvm"},
    ("POST", "/v1/vms/{vm}/what-if"): {
        "ops": [{"op": "delete_memslot", "slot": 0}], "variants": [{"name": "x"}],
    },
    ("POST", "/v1/tokens"): {"tenant": "c"},
}  # fmt: skip
QUERIES: dict[str, dict[str, Any]] = {
    "/v1/vms/{vm}/translate": {"gpa": 0},
    **{p: {"timeout": 0.05} for p in STREAMS},
}


class World:
    """One tenant's VM with a memslot, a guest_memfd and a snapshot: every path parameter."""

    def __init__(self, vm: str, fd: int, snapshot: str) -> None:
        self.vm, self.fd, self.snapshot = vm, fd, snapshot

    @classmethod
    async def build(cls, client: httpx.AsyncClient, head: dict[str, str]) -> World:
        async def ok(r: Any, status: int = 200) -> Any:
            r = await r
            assert r.status_code == status, r.text
            return r.json()

        vm = (await ok(client.post("/v1/vms", json={}, headers=head), 201))["id"]
        slot = BODIES[("PUT", "/v1/vms/{vm}/memslots/{slot}")]
        await ok(client.put(f"/v1/vms/{vm}/memslots/0", json=slot, headers=head))
        gmem = {"size": 2 * MiB, "flags": 1}
        fd = await ok(client.post(f"/v1/vms/{vm}/guest-memfds", json=gmem, headers=head), 201)
        snap = await ok(client.post(f"/v1/vms/{vm}/snapshots", json={}, headers=head), 201)
        return cls(vm, fd["fd"], snap["id"])


def changes_state(method: str, path: str) -> bool:
    return method != "GET" and path not in READ_ONLY_POSTS


def expected(who: str, method: str, path: str, documented: set[int]) -> set[int]:
    """The statuses the security model allows this caller on this route."""
    if path in OPEN:
        return {200}
    if who in ("none", "wrong"):
        return {401}
    if path.startswith("/v1/tokens"):
        return documented - {401, 403, 429, 500, 503} if who == "admin" else {403}
    if path == "/metrics":
        return {200}
    if who == "read_only" and changes_state(method, path):
        return {403}
    if who == "other" and "{vm}" in path:
        return {404}
    return documented - {401, 429, 500, 503}


async def test_every_route_for_every_caller(make_client: Callable[..., Any]) -> None:
    client = await secured(make_client, token_rate_per_s=0)
    spec = client.app.openapi()  # type: ignore[attr-defined]
    heads = {
        "none": {},
        "wrong": bearer("vkmmu_" + "w" * 43),
        "owner": bearer((await issue(client, "a"))["token"]),
        "read_only": bearer((await issue(client, "a", ["read"]))["token"]),
        "other": bearer((await issue(client, "b"))["token"]),
        "admin": bearer(ADMIN),
    }
    tenant_of = {"owner": "a", "read_only": "a", "other": "b"}
    shared = {"a": await World.build(client, heads["owner"])}
    shared["b"] = await World.build(client, heads["other"])
    ids: dict[str, set[str]] = {"a": set(), "b": set()}
    for t, w in shared.items():
        ids[t] |= {w.vm, w.snapshot}

    async def world_for(who: str, method: str, path: str) -> World:
        # Calls that may change a VM get a fresh one of tenant `a`; reads share one.
        if who in ("owner", "admin") or (who == "read_only" and not changes_state(method, path)):
            if method != "GET":
                w = await World.build(client, heads["owner"])
                ids["a"] |= {w.vm, w.snapshot}
                return w
        return shared["a"]

    walked: dict[str, int] = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            method = method.upper()
            documented = {int(s) for s in op["responses"]}
            for who in WHO:
                w = await world_for(who, method, path)
                token_id = (await issue(client, "scratch"))["id"] if "{token}" in path else ""
                url = (
                    path.replace("{vm}", w.vm)
                    .replace("{vcpu}", "0")
                    .replace("{slot}", "0")
                    .replace("{fd}", str(w.fd))
                    .replace("{snapshot}", w.snapshot)
                    .replace("{token}", token_id)
                )
                kw: dict[str, Any] = {"headers": heads[who], "params": QUERIES.get(path, {})}
                if "requestBody" in op:
                    if "application/json" in op["requestBody"]["content"]:
                        kw["json"] = BODIES.get((method, path), {})
                    else:
                        kw["content"] = b""
                        kw["headers"] = {**heads[who], "Content-Type": "text/plain"}
                r = await client.request(method, url, **kw)
                where = f"{who}: {method} {path} -> {r.status_code} {r.text[:300]}"
                assert r.status_code in documented, where
                assert r.status_code in expected(who, method, path, documented), where
                if r.status_code == 401:
                    assert r.headers["www-authenticate"].startswith("Bearer"), where
                if who in ("owner", "admin", "read_only") and r.status_code == 404:
                    assert "vm-not-found" not in r.text, where
                if r.status_code == 403 and who in ("owner", "admin") and "tokens" not in path:
                    assert "kvm-errno" in r.text, where  # KVM's EPERM, never the auth rule
                mine = tenant_of.get(who)
                if mine is not None:
                    theirs = ids["b" if mine == "a" else "a"]
                    leaked = {i for i in theirs if i in r.text and i not in url}
                    assert not leaked, where
                walked[f"{who} {r.status_code}"] = walked.get(f"{who} {r.status_code}", 0) + 1
    # Owners got real work done, not only 4xx: most of their calls succeeded.
    owner_ok = sum(n for k, n in walked.items() if k.startswith("owner 2"))
    owner_all = sum(n for k, n in walked.items() if k.startswith("owner "))
    assert owner_ok >= owner_all * 3 // 4, walked
    # No event of one tenant reaches the other's stream.
    for who, other in (("owner", "b"), ("other", "a")):
        text = (
            await client.get("/v1/events", params={"after": 0, "timeout": 0.1}, headers=heads[who])
        ).text
        assert not {i for i in ids[other] if i in text}, who
        assert (await client.get("/metrics", headers=heads[who])).status_code == 200
        scrape = (await client.get("/metrics", headers=heads[who])).text
        assert not {i for i in ids[other] if i in scrape}, who
