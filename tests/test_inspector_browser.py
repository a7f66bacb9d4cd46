"""The inspector in a real browser (headless Debian chromium driven by selenium, as
tests/test_sse.py does), on the three dialects: every page against the seeded database shows
what a person should see, with no console error and no stored string run as script; the live
view shows events appended while it is open. Screenshots go to ``$BAP_SCREENSHOTS`` (default:
the test's tmp dir) for a person to look at.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, ContextManager, Iterator, List

import peewee

from better_agent_peewee import create_tables, peewee_storage
from better_agent_peewee.inspector import inspector_app, make_inspector_server
from tests.inspector_seed import HOSTILE, seed
from tests.test_sse import chromium


@contextlib.contextmanager
def serving(storage: Any, **options: Any) -> Iterator[str]:
    """The inspector on the standard-library server on a free 127.0.0.1 port: its base URL."""
    server = make_inspector_server(inspector_app(storage, **options), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def browser(profile: Path) -> ContextManager[Any]:
    """Headless chromium keeping the console log, with room for a whole page."""
    return chromium(profile, "--window-size=1280,1500", console_log=True)


def console_problems(driver: Any) -> List[str]:
    """Console entries of level WARNING or worse since the last call (a CSP refusal is SEVERE)."""
    return [
        f"{e['level']}: {e['message']}"
        for e in driver.get_log("browser")
        if e["level"] in ("SEVERE", "WARNING")
    ]


def test_a_person_sees_every_page_and_the_live_run(
    database: peewee.Database, tmp_path: Path, dialect: str
) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    create_tables(database)
    storage = peewee_storage(database)
    seed(storage)
    storage.database.close()
    shots = Path(os.environ.get("BAP_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with serving(storage, allow_writes=True) as base, browser(tmp_path / "profile") as driver:
        # (A page being replaced by the next one makes its elements stale for a moment: look again.)
        wait = WebDriverWait(
            driver, 30, ignored_exceptions=[StaleElementReferenceException, NoSuchElementException]
        )

        def visit(path: str, name: str) -> str:
            driver.get(base + path)
            wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
            assert driver.execute_script("return window.__pwned") is None, f"a stored string ran on {path}"
            problems = console_problems(driver)
            assert not problems, f"{path}: {problems}"
            driver.save_screenshot(str(shots / f"{dialect}-{name}.png"))
            return str(driver.find_element(By.TAG_NAME, "main").text)

        text = visit("/", "overview")
        assert "Runs per hour" in text and "support" in text and "planner" in text and "stale?" in text
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart rect")) > 20  # bars were drawn
        driver.find_element(By.LINK_TEXT, "support").click()
        assert "Trip to Lisbon" in driver.find_element(By.TAG_NAME, "main").text
        # Search by id prefix as a person would: type it, press Search, read the list.
        driver.find_element(By.NAME, "q").send_keys("support-03")
        driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
        wait.until(lambda d: "q=support-03" in d.current_url)
        listed = driver.find_element(By.CSS_SELECTOR, "table.threads").text
        assert all(f"support-03{i}" in listed for i in range(10)), listed
        assert "support-029" not in listed and "Trip to Lisbon" not in listed
        assert not console_problems(driver)
        driver.save_screenshot(str(shots / f"{dialect}-thread-search.png"))
        text = visit("/threads/trip-to-lisbon", "thread")
        assert "TOOL CALL search_hotels" in text and "result of tool call call-1" in text
        assert "Alfama Rooms: 480 EUR" in text and "failed" in text
        text = visit("/runs?agent=support", "runs")
        assert (
            "run-trip-2" in text and "planner" not in driver.find_element(By.CSS_SELECTOR, "table.runs").text
        )
        text = visit("/runs/run-trip-2", "run")
        assert "booking API answered 503" in text
        driver.find_element(By.CSS_SELECTOR, 'li[data-seq="6"] summary').click()  # expand a payload
        assert '"code": "AGENT_ERROR"' in driver.find_element(By.CSS_SELECTOR, 'li[data-seq="6"] pre').text
        for path in ("/threads/evil-0", "/threads/evil-1", "/threads/evil-3", "/runs/run-hostile"):
            text = visit(path, path.strip("/").replace("/", "-"))
            assert HOSTILE[0] in text or HOSTILE[1] in text or HOSTILE[3] in text or "RUN_ERROR" in text
        # Live: events appended while the page is open appear, then the end of the stream.
        visit("/runs/run-live", "live")
        wait.until(lambda d: d.find_element(By.ID, "live-status").text == "live")
        storage.streams.append(
            "run-live", {"type": "TEXT_MESSAGE_CONTENT", "messageId": "x", "delta": HOSTILE[0]}
        )
        storage.streams.append(
            "run-live", {"type": "TOOL_CALL_START", "toolCallId": "c9", "toolCallName": "book"}
        )
        storage.database.close()

        def seqs(_: Any) -> List[str]:
            return [
                li.get_attribute("data-seq") for li in driver.find_elements(By.CSS_SELECTOR, "#timeline li")
            ]

        wait.until(lambda d: seqs(d)[-2:] == ["6", "7"])
        assert seqs(driver) == ["1", "2", "3", "4", "5", "6", "7"]
        assert driver.find_element(By.CSS_SELECTOR, 'li[data-seq="7"] .type').text == "TOOL_CALL_START"
        driver.find_element(By.CSS_SELECTOR, 'li[data-seq="6"] summary').click()
        assert HOSTILE[0] in driver.find_element(By.CSS_SELECTOR, 'li[data-seq="6"] pre').text
        assert driver.execute_script("return window.__pwned") is None
        driver.save_screenshot(str(shots / f"{dialect}-live.png"))
        storage.streams.close("run-live")
        storage.database.close()
        wait.until(lambda d: d.find_element(By.ID, "live-status").text.startswith("ended"))
        assert not console_problems(driver)
        # A write, as a person does it: the abort button of a running run.
        visit("/runs/run-stale", "abort")
        driver.find_element(By.XPATH, "//button[text()='Abort this run']").click()
        wait.until(lambda d: "Abort requested at" in d.find_element(By.TAG_NAME, "main").text)
    assert storage.runs.get("run-stale")["abortRequestedAt"] is not None
