"""GET /dashboard end to end: a real `vkmmu serve`, headless Chromium (Debian's, driven by
Selenium through Debian's chromedriver): after a memslot delete the page shows the zap."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.e2e.test_server import Server

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(
    os.environ.get("VKMMU_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")
)
MiB = 1 << 20
HVA = 0x7F00_0000_0000


@pytest.fixture
def browser() -> Iterator[Any]:
    driver_path = shutil.which("chromedriver")
    require(
        os.path.exists(CHROMIUM) and driver_path is not None,
        "chromium and chromedriver (.ci/deps/chromium.sh)",
    )
    require(importlib.util.find_spec("selenium") is not None, "selenium (the dev extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1300",
    ):
        opts.add_argument(arg)
    # An explicit driver: Selenium never looks for (or downloads) one itself.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, css: str, timeout: float = 20.0) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def test_dashboard_shows_the_zap_of_a_slot_delete(server: Server, browser: Any) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        vm = c.post("/v1/vms", json={"name": "dash"}).json()["id"]
        for slot, gpa in ((0, 0), (1, 4 * MiB)):
            r = c.put(
                f"/v1/vms/{vm}/memslots/{slot}",
                json={"guest_phys_addr": gpa, "memory_size": 4 * MiB, "userspace_addr": HVA + gpa},
            )
            assert r.status_code == 200, r.text
        for gpa in (0, 4 * MiB):
            r = c.post(
                f"/v1/vms/{vm}/vcpus/0/accesses",
                json={"gpa": gpa, "size": 2 * MiB, "access": "write"},
            )
            assert r.status_code == 200, r.text
        page = c.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # Offline: nothing the page loads comes from another origin.
        assert "http://" not in page.text and "https://" not in page.text

        browser.get(f"{server.base}/dashboard")
        wait_for(browser, f'#vm-list li[data-vm="{vm}"].sel')
        wait_for(browser, '#memslot-map rect[data-slot="1"]')
        wait_for(browser, '#status[data-state="live"]')
        wait_for(browser, '#mapped-chart path[data-series="4k"]')
        assert not browser.find_elements("css selector", "#zap-rows tr")

        r = c.delete(f"/v1/vms/{vm}/memslots/1")
        assert r.status_code == 200, r.text
        zap = r.json()["zap"]
        row = wait_for(browser, f'#zap-rows tr[data-seq="{zap["seq"]}"]')
        cells = [td.text for td in row.find_elements("css selector", "td")]
        assert cells[2:4] == [zap["path"], "memslot_delete"]
        s = zap["sptes_zapped"]
        assert cells[6] == f"{s['4k']}/{s['2m']}/{s['1g']}"
        assert cells[5] == "on"  # KVM_X86_QUIRK_SLOT_ZAP_ALL is on by default
        wait_for(browser, f'#zap-timeline circle[data-seq="{zap["seq"]}"]')
        wait_for(browser, '#event-log li[data-type="zap"]')
        # The memslot map follows: slot 1 is gone.
        deadline = time.monotonic() + 10
        while browser.find_elements("css selector", '#memslot-map rect[data-slot="1"]'):
            assert time.monotonic() < deadline, "slot 1 still drawn after its delete"
            time.sleep(0.1)
        time.sleep(0.5)  # let the stats poll redraw the charts for the picture
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        # No script error, no failed load.
        errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors
