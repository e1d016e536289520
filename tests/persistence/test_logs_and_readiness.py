"""Logs: every logger writes JSON lines with the request id, worker threads included.
Readiness: a database outage is reported without the driver's details (hosts, ports, paths)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from app.api.log import configure_logging, request_id_var
from app.config import Settings
from app.main import create_app
from app.services.errors import ServiceUnavailable
from app.services.vms import VmService
from tests.persistence.conftest import ServiceFactory, sqlite_url
from tests.persistence.fake_engine import FAKE_ENGINE
from tests.persistence.test_service import new_vm


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_every_logger_writes_json_with_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    token = request_id_var.set("rid-42")
    try:
        logging.getLogger("app.services.vms").info("info from the service layer")
        logging.getLogger("uvicorn.error").info("info from the server")
        logging.getLogger("some.library").warning("a library warning")
        logging.getLogger("some.library").info("a library's info stays out")
    finally:
        request_id_var.reset(token)
    lines = _json_lines(capsys.readouterr().err)
    by_msg = {line["msg"]: line for line in lines}
    for msg, logger in (
        ("info from the service layer", "app.services.vms"),
        ("info from the server", "uvicorn.error"),
        ("a library warning", "some.library"),
    ):
        assert by_msg[msg]["logger"] == logger
        assert by_msg[msg]["request_id"] == "rid-42"
    assert "a library's info stays out" not in by_msg


class _Ids(logging.Handler):
    """Keeps the request id current where each record is emitted (the worker thread)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), request_id_var.get()))


async def test_worker_thread_logs_carry_the_request_id(
    tmp_path: Path, make_service: ServiceFactory
) -> None:
    svc = await make_service(sqlite_url(tmp_path), FAKE_ENGINE)
    vm_id = await new_vm(svc)
    ids = _Ids()
    logger = logging.getLogger("app.services.vms")
    logger.addHandler(ids)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    token = request_id_var.set("rid-snap")
    try:
        await svc.create_snapshot(vm_id)  # logs "snapshot … of VM …" from a worker thread
    finally:
        request_id_var.reset(token)
        logger.removeHandler(ids)
        logger.setLevel(old_level)
    assert any(msg.startswith("snapshot ") and rid == "rid-snap" for msg, rid in ids.seen)


async def test_readyz_hides_driver_details(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir-secret" / "x.db"
    url = sqlite_url(missing)
    svc = VmService(url, engine=FAKE_ENGINE, run_migrations=False)
    app = create_app(Settings(database_url=url), service=svc)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["detail"].startswith("database unavailable")
    assert "no-such-dir-secret" not in r.text and "OperationalError" not in r.text


def test_service_unavailable_message_has_no_driver_text() -> None:
    e = ServiceUnavailable('OperationalError: connection to "db.internal" port 5432 failed')
    assert str(e) == "the database is unavailable"
    assert "db.internal" in e.reason  # kept for the log
