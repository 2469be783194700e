"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

An operator opens the overview, filters the instances, opens one, sees its
timeline, terminates it (accepting the confirmation) and sees the status
change; the page of another, sleeping, instance follows it to its end by
itself. Each page is saved as a screenshot under ``test-output/screenshots/``.
The test is skipped, saying how to install them, only where the browser or
its driver is missing (``make browser`` installs both).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from stepline import Client, Producer, Schedule
from stepline.shared.settings import Settings
from stepline.shared.topology import routing_key
from tests.support import db
from tests.support.amqp import dead_letter_count, publish_raw
from tests.support.dashboard import ui_process
from tests.support.fleet import ROOT, ProcessFleet, until_consuming
from tests.support.polling import eventually, until_status

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

SCREENSHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)
WAIT_S = 20


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium driven by its chromedriver; quit (driver and browser) even if the test fails."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "headless Chromium is not installed (Debian packages chromium and chromium-driver): "
            "run `make browser`"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,900"):
        options.add_argument(argument)
    options.add_argument("--force-device-scale-factor=1")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def snap(driver: Any, name: str) -> Path:
    """Save the whole page as ``test-output/screenshots/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1360, min(max(height, 700), 4000))
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1360, 900)
    return path


async def _seed(settings: Settings) -> dict[str, str]:
    """What an operator finds: finished, failed, sleeping and waiting instances, a dead letter, a schedule."""
    await until_consuming(settings, ["approval", "sequence", "sleeper", "parent", "non-retryable"])
    async with (
        Producer(settings.amqp, namespace=settings.namespace, broker=settings.broker) as producer,
        Client(
            settings.database, settings.amqp, namespace=settings.namespace, broker=settings.broker
        ) as client,
    ):
        made = {
            "parent": await producer.start("parent", {"a": 2, "b": 3}, instance_id="order-1041"),
            "failed": await producer.start("non-retryable", None, instance_id="charge-1042"),
            "sleeper": await producer.start("sleeper", {"duration": "2 hours"}, instance_id="reminder-1043"),
        }
        for number in range(3):
            await client.wait(await producer.start("sequence", {"a": number, "b": 1}), timeout=30)
        made["approval"] = await producer.start("approval", {"timeout": "1 day"}, instance_id="refund-1044")
        for instance_id in (made["parent"], made["failed"]):
            await client.wait(instance_id, timeout=30)
        await until_status(client, made["approval"], "waiting")
        await until_status(client, made["sleeper"], "waiting")
        unknown = {"v": 1, "kind": "start", "workflow": "invoice", "instance_id": "inv-7", "params": None}
        await publish_raw(
            settings.amqp,
            settings.namespace,
            routing_key("start", "sequence"),
            json.dumps(unknown).encode(),
            {},
        )
        await eventually(lambda: dead_letter_count(settings.amqp, settings.namespace), check=lambda n: n == 1)
        await client.create_schedule(
            "nightly-report", "sequence", Schedule("0 2 * * *", params={"a": 1, "b": 2})
        )
    return made


def test_an_operator_filters_opens_an_instance_and_terminates_it(
    settings: Settings, process_fleet: ProcessFleet, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    process_fleet.start("worker", "stepline-worker", "--workflows", "tests.workflows")
    process_fleet.start("scheduler", "stepline-scheduler")
    made = asyncio.run(_seed(settings))

    with ui_process(settings, tmp_path) as url, chromium() as browser:
        wait = WebDriverWait(browser, WAIT_S)
        browser.get(f"{url}/")
        wait.until(expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Overview"))
        table = browser.find_element(By.CSS_SELECTOR, "table.grid").text
        assert "approval" in table and "sequence" in table
        snap(browser, "overview")

        browser.find_element(By.LINK_TEXT, "Instances").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "filters")))
        Select(browser.find_element(By.NAME, "workflow")).select_by_value("approval")
        Select(browser.find_element(By.NAME, "status")).select_by_value("waiting")
        browser.find_element(By.ID, "apply-filters").click()
        wait.until(expected_conditions.url_contains("workflow=approval"))
        assert "status=waiting" in browser.current_url  # the filters are in the address
        rows = browser.find_elements(By.CSS_SELECTOR, "#instances tbody tr")
        assert [row.find_element(By.CSS_SELECTOR, "td a").text for row in rows] == [made["approval"]]
        snap(browser, "instances")

        rows[0].find_element(By.CSS_SELECTOR, "td a").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "timeline")))
        bars = browser.find_elements(By.CSS_SELECTOR, "#timeline g.gbar")
        labels = [bar.find_element(By.CSS_SELECTOR, "text").text for bar in bars]
        assert labels == ["submit #1", "event decision"], labels
        assert "for event `approved`" in browser.find_element(By.ID, "why").text
        snap(browser, "instance")

        browser.find_element(By.XPATH, "//button[normalize-space()='Terminate']").click()
        alert = wait.until(expected_conditions.alert_is_present())
        assert "Terminate refund-1044" in alert.text
        alert.accept()
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "terminated"))
        assert "Terminated." in browser.find_element(By.CSS_SELECTOR, ".flash.ok").text
        snap(browser, "instance-terminated")

        # The page of an unfinished instance follows it by itself: its sleep ends, it completes.
        browser.get(f"{url}/instances/{made['sleeper']}")
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "waiting"))
        asyncio.run(db.time_passes(settings.database, instance_id=made["sleeper"]))
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "complete"))
        assert "complete at" in browser.find_element(By.ID, "why").text
        snap(browser, "instance-live")

        browser.get(f"{url}/instances/{made['parent']}")
        wait.until(expected_conditions.presence_of_element_located((By.ID, "timeline")))
        snap(browser, "instance-parent")
        browser.get(f"{url}/instances/{made['failed']}")
        wait.until(expected_conditions.presence_of_element_located((By.ID, "timeline")))
        snap(browser, "instance-failed")
        browser.find_element(By.LINK_TEXT, "Dead letters").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "dead-letters")))
        assert "unknown workflow 'invoice'" in browser.find_element(By.ID, "dead-letters").text
        snap(browser, "dead-letters")
        browser.find_element(By.LINK_TEXT, "Schedules").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "schedules")))
        assert "nightly-report" in browser.find_element(By.ID, "schedules").text
        snap(browser, "schedules")
        browser.get(f"{url}/")
        snap(browser, "overview-after")
