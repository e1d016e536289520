"""The dashboard with tokens turned on, end to end (a real server, headless Chromium): a
browser without a token gets the sign-in form; signed in with a tenant's token the page
shows that tenant's VMs only and its event stream (fetch, with the bearer header) is live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_server import Server
from tests.observability.test_dashboard import browser, wait_for

pytestmark = pytest.mark.e2e
__all__ = ["browser"]

ADMIN = "dash-admin-token"
MiB = 1 << 20
HVA = 0x7F00_0000_0000


def test_dashboard_signs_in_and_shows_one_tenant(tmp_path: Path, browser: Any) -> None:
    server = Server(
        tmp_path / "vkmmu.db", tmp_path / "server.log", env={"VKMMU_ADMIN_TOKEN": ADMIN}
    )
    server.start()
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=server.base, timeout=30, headers=admin) as c:
            tokens = {}
            vms = {}
            for tenant in ("a", "b"):
                r = c.post("/v1/tokens", json={"tenant": tenant})
                assert r.status_code == 201, r.text
                tokens[tenant] = r.json()["token"]
                head = {"Authorization": f"Bearer {tokens[tenant]}"}
                r = c.post("/v1/vms", json={"name": tenant}, headers=head)
                vms[tenant] = r.json()["id"]

            browser.get(f"{server.base}/dashboard")
            wait_for(browser, "form#f input#t")  # the sign-in form, answered with a 401
            browser.add_cookie({"name": "vkmmu_token", "value": tokens["a"], "path": "/"})
            browser.get(f"{server.base}/dashboard")
            wait_for(browser, f'#vm-list li[data-vm="{vms["a"]}"]')
            wait_for(browser, '#status[data-state="live"]')
            assert not browser.find_elements("css selector", f'#vm-list li[data-vm="{vms["b"]}"]')
            # A memslot of tenant a reaches the page through the token-bearing stream.
            head = {"Authorization": f"Bearer {tokens['a']}"}
            slot = {"guest_phys_addr": 0, "memory_size": 4 * MiB, "userspace_addr": HVA}
            r = c.put(f"/v1/vms/{vms['a']}/memslots/0", json=slot, headers=head)
            assert r.status_code == 200, r.text
            wait_for(browser, '#memslot-map rect[data-slot="0"]')
            wait_for(browser, '#event-log li[data-type="memslot"]')
            # Tenant b's VM never shows up, even when it changes.
            head_b = {"Authorization": f"Bearer {tokens['b']}"}
            r = c.put(f"/v1/vms/{vms['b']}/memslots/0", json=slot, headers=head_b)
            assert r.status_code == 200, r.text
            assert vms["b"] not in browser.page_source
    finally:
        server.stop()
