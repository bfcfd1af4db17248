"""The dashboard in a real Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
Selenium: an operator follows a failed job from the overview, retries it from its page, sees it
succeed once a worker ran it, searches a tag, and pauses a queue.  Each page visited is saved as a screenshot
under the test's temporary directory.

One browser serves every backend's test (starting Chromium is most of the cost); each test
runs its own threaded server on a free port.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import FLAKY, QUEUE, enqueue, flaky, ok, run_queue

from mqueue import admin
from mqueue.web import app
from mqueue.web.server import make_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture
def served(db):
    """The dashboard of ``db`` on a threaded server; its base URL."""
    server = make_server(app(db), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Pages:
    """Opens pages and keeps a screenshot of each."""

    def __init__(self, driver, base: str, folder: Path) -> None:
        self.driver, self.base, self.folder, self.count = driver, base, folder, 0

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path))
        return path

    def click(self, text: str) -> None:
        from selenium.webdriver.common.by import By
        self.driver.find_element(By.XPATH, f"//a[normalize-space()='{text}'] | //button[normalize-space()='{text}']"
                                 ).click()

    def titled(self, title: str) -> None:
        """Wait for the page called ``title`` (a submitted form navigates after send_keys returns)."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(self.driver, 10).until(expected_conditions.title_is(f"{title} · mqueue"))

    def text(self, css: str) -> str:
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.CSS_SELECTOR, css).text


def test_operator_retries_a_failed_job_searches_a_tag_and_pauses_a_queue(db, served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    for n in range(3):
        enqueue(db, ok, n=n)
    job_id = enqueue(db, flaky, tags=["customer-42"])
    run_queue(db)
    pages = Pages(browser, served, tmp_path)

    browser.get(served + "/")
    assert browser.title == "Queues · mqueue"
    pages.shot("overview")
    row = browser.find_element(By.XPATH, f"//table[@class='queues']//tr[td/a[text()='{QUEUE}']]")
    row.find_element(By.CSS_SELECTOR, "a[href*='state=failed']").click()  # the failed count
    pages.titled(f"Queue {QUEUE}")
    assert "failed (1)" in pages.text("nav.tabs a.current")
    pages.shot("queue-failed")
    pages.click(f"#{job_id}")
    pages.titled(f"Job {job_id}")
    assert "ConnectionError: payment service down" in pages.text("article.failure pre")
    pages.shot("job-failed")

    pages.click("Retry now")
    assert pages.text("p.done") == "Job retried: it is queued, due now."
    assert pages.text("span.state") == "queued"
    FLAKY["fail"] = False
    run_queue(db)
    browser.refresh()
    assert pages.text("span.state") == "succeeded"
    assert admin.get_job(db, job_id).state == "succeeded"
    pages.shot("job-succeeded")

    pages.click("Failed")
    pages.titled("Failed jobs")
    assert "no failed jobs" in pages.text("main")
    pages.shot("failed")

    search = browser.find_element(By.CSS_SELECTOR, "header input[name=tag]")
    search.send_keys("customer-42", Keys.ENTER)
    pages.titled("Tags")
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "table.jobs td:first-child a")]
    assert links == [f"#{job_id}"]
    pages.shot("tag-search")

    browser.get(served + "/")
    row = browser.find_element(By.XPATH, f"//table[@class='queues']//tr[td/a[text()='{QUEUE}']]")
    row.find_element(By.XPATH, ".//button[text()='Pause']").click()
    browser.switch_to.alert.accept()  # the page's script asks first
    assert pages.text("p.done").startswith("Queue paused")
    row = browser.find_element(By.XPATH, f"//table[@class='queues']//tr[td/a[text()='{QUEUE}']]")
    assert row.find_element(By.CSS_SELECTOR, "span.paused").text == "paused"
    assert admin.paused_queues(db) == {QUEUE}
    pages.shot("overview-paused")

    for path, name in (("/stats?queue=" + QUEUE, "stats"), ("/crons", "crons"), ("/tracked", "tracked"),
                       ("/workers", "workers")):
        browser.get(served + path)
        pages.shot(name)
    assert len(list(tmp_path.glob("*.png"))) == pages.count == 11
