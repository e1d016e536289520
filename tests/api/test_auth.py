"""Bearer tokens: the admin token, tenant tokens (`/v1/tokens`, `vkmmu token`), scopes, the
metrics token, the per-token rate, and the open service bound to loopback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.cli import is_loopback, main
from tests.api.auth_helpers import ADMIN, METRICS, bearer, issue, secured
from tests.api.conftest import sqlite_url
from tests.api.helpers import assert_problem, ok


def assert_401(r: Any) -> None:
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_the_service_is_open_without_an_admin_token(client: Any) -> None:
    vm = ok(await client.post("/v1/vms", json={}), 201)
    assert vm["tenant"] == "default"
    assert ok(await client.get("/v1/vms"))["items"][0]["id"] == vm["id"]
    assert (await client.get("/metrics")).status_code == 200
    # Tokens can be issued (the open service acts as the admin).
    assert (await client.post("/v1/tokens", json={"tenant": "a"})).status_code == 201


async def test_missing_or_wrong_token_is_401_with_a_bearer_challenge(
    make_client: Callable[..., Any],
) -> None:
    client = await secured(make_client)
    for headers in ({}, bearer("nope"), {"Authorization": "Basic YTpi"}, bearer("")):
        assert_401(await client.get("/v1/vms", headers=headers))
        assert_401(await client.post("/v1/vms", json={}, headers=headers))
    wrong = await client.get("/v1/vms", headers=bearer("vkmmu_" + "x" * 43))
    assert_401(wrong)
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    # Health stays open; metrics, docs, the spec and the dashboard follow the API's rule.
    assert ok(await client.get("/healthz"))["status"] == "ok"
    assert (await client.get("/readyz")).status_code == 200
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/dashboard", "/v1/tokens"):
        assert_401(await client.get(path))
    for path in ("/docs", "/openapi.json", "/dashboard"):
        assert (await client.get(path, headers=bearer(ADMIN))).status_code == 200
        # A browser sends the cookie; the API itself never takes it (no CSRF).
        client.cookies.set("vkmmu_token", ADMIN)
        assert (await client.get(path)).status_code == 200
        assert_401(await client.get("/v1/vms"))
        client.cookies.clear()


async def test_who_may_call_is_answered_before_an_unknown_query_parameter(
    make_client: Callable[..., Any],
) -> None:
    """Each router's one dependency checks the caller first, then the query (app/api/router.py)."""
    client = await secured(make_client)
    tenant = (await issue(client, "t"))["token"]
    for path in ("/v1/vms?bogus=1", "/dashboard?bogus=1", "/v1/tokens?bogus=1"):
        assert_401(await client.get(path))
    # The pages and the API check the query once the caller may call them.
    for path in ("/v1/vms?bogus=1", "/dashboard?bogus=1", "/v1/tokens?bogus=1"):
        r = await client.get(path, headers=bearer(ADMIN))
        assert_problem(r, 422)
        assert r.json()["errors"][0]["loc"] == ["query", "bogus"], r.json()
    # A tenant may not manage tokens: 403 comes before the query's 422.
    assert_problem(await client.get("/v1/tokens?bogus=1", headers=bearer(tenant)), 403)
    # /metrics keeps its own rule: a scraper's extra parameters are not refused.
    assert (await client.get("/metrics?bogus=1", headers=bearer(METRICS))).status_code == 200


async def test_admin_issues_lists_and_revokes_tenant_tokens(
    make_client: Callable[..., Any],
) -> None:
    client = await secured(make_client)
    created = await issue(client, "team-a")
    assert created["token"].startswith("vkmmu_") and created["id"].startswith("tok-")
    assert created["scopes"] == ["read", "write"] and created["revoked_at"] is None
    tok = bearer(created["token"])
    vm = ok(await client.post("/v1/vms", json={}, headers=tok), 201)
    assert vm["tenant"] == "team-a"
    listed = ok(await client.get("/v1/tokens", headers=bearer(ADMIN)))["items"]
    assert [t["id"] for t in listed] == [created["id"]]
    assert "token" not in listed[0]  # shown once, at creation
    assert created["token"] not in (await client.get("/v1/tokens", headers=bearer(ADMIN))).text
    # Only the admin manages tokens.
    assert_problem(await client.post("/v1/tokens", json={"tenant": "x"}, headers=tok), 403)
    assert_problem(await client.get("/v1/tokens", headers=tok), 403)
    revoked = ok(await client.delete(f"/v1/tokens/{created['id']}", headers=bearer(ADMIN)))
    assert revoked["revoked_at"] is not None
    assert_401(await client.get("/v1/vms", headers=tok))
    assert_problem(await client.delete("/v1/tokens/tok-0123", headers=bearer(ADMIN)), 404)
    bad = await client.post("/v1/tokens", json={"tenant": "Bad Name"}, headers=bearer(ADMIN))
    assert_problem(bad, 422)


async def test_the_database_keeps_only_keyed_hashes(
    make_client: Callable[..., Any], db_path: Path
) -> None:
    import sqlite3

    client = await secured(make_client)
    created = await issue(client, "team-a")
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT * FROM tokens").fetchall()
    assert rows and created["token"] not in repr(rows)
    assert created["token"][6:] not in repr(rows)


async def test_a_read_only_token_reads_but_changes_nothing(
    make_client: Callable[..., Any],
) -> None:
    client = await secured(make_client)
    writer = bearer((await issue(client, "team-a"))["token"])
    reader = bearer((await issue(client, "team-a", ["read"]))["token"])
    vm = ok(await client.post("/v1/vms", json={}, headers=writer), 201)["id"]
    assert ok(await client.get(f"/v1/vms/{vm}", headers=reader))["id"] == vm
    assert_problem(await client.post("/v1/vms", json={}, headers=reader), 403)
    assert_problem(await client.delete(f"/v1/vms/{vm}", headers=reader), 403)
    assert_problem(await client.post(f"/v1/vms/{vm}/snapshots", json={}, headers=reader), 403)
    assert ok(await client.get(f"/v1/vms/{vm}", headers=writer))["version"] == 0


async def test_the_metrics_token_reads_metrics_only(make_client: Callable[..., Any]) -> None:
    client = await secured(make_client)
    r = await client.get("/metrics", headers=bearer(METRICS))
    assert r.status_code == 200 and "vkmmu_vms" in r.text
    assert_problem(await client.get("/v1/vms", headers=bearer(METRICS)), 403)
    assert_problem(await client.get("/dashboard", headers=bearer(METRICS)), 403)


async def test_a_token_past_its_rate_gets_429_with_retry_after(
    make_client: Callable[..., Any],
) -> None:
    client = await secured(make_client, token_rate_per_s=3.0)
    tok = bearer((await issue(client, "team-a"))["token"])
    answers = [(await client.get("/v1/vms", headers=tok)).status_code for _ in range(6)]
    assert answers[:3] == [200, 200, 200] and 429 in answers
    r = await client.get("/v1/vms", headers=tok)
    assert_problem(r, 429)
    assert int(r.headers["retry-after"]) >= 1
    # The admin is not rate limited.
    assert all(
        [(await client.get("/v1/vms", headers=bearer(ADMIN))).status_code == 200 for _ in range(6)]
    )


async def test_tokens_survive_a_restart(make_client: Callable[..., Any]) -> None:
    first = await secured(make_client)
    created = await issue(first, "team-a")
    vm = ok(await first.post("/v1/vms", json={}, headers=bearer(created["token"])), 201)["id"]
    second = await secured(make_client)  # a new app and service on the same database
    assert ok(await second.get(f"/v1/vms/{vm}", headers=bearer(created["token"])))["id"] == vm


def test_cli_issues_lists_and_revokes_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VKMMU_DATABASE_URL", sqlite_url(tmp_path / "t.db"))
    assert main(["token", "create", "--tenant", "team-a", "--read-only"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["tenant"] == "team-a" and created["scopes"] == ["read"]
    assert main(["token", "list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["id"] for t in listed] == [created["id"]] and "token" not in listed[0]
    assert main(["token", "revoke", created["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["revoked_at"] is not None
    assert main(["token", "revoke", "tok-00"]) == 1
    assert main(["token", "create", "--tenant", "NO"]) == 2


async def test_a_cli_token_works_against_the_service(
    make_client: Callable[..., Any],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VKMMU_DATABASE_URL", sqlite_url(db_path))
    assert main(["token", "create", "--tenant", "team-b"]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    client = await secured(make_client)
    assert ok(await client.post("/v1/vms", json={}, headers=bearer(token)), 201)["tenant"] == (
        "team-b"
    )


def test_serve_without_an_admin_token_binds_loopback_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VKMMU_ADMIN_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "VKMMU_ADMIN_TOKEN" in err and "loopback" in err
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.1.2.3", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org"))
