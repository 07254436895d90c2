"""The web page at / in a real browser: Debian's headless Chromium driven by Selenium.

Uploads t1.jpg with blur, waits for the streamed result, checks the six faces the page lists
and that the image it offers for download differs from the photo inside every listed box;
then checks the page shows the server's own error for a corrupt file. Runs in CI
(scripts/setup.sh --test installs chromium and chromium-driver).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masquerade.engine.engine import Engine, EngineConfig
from sample_images import t1_image_path
from server_support import BackgroundServer, loopback_config

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = "MASQUERADE_SCREENSHOT_TO"  # set to also write the screenshot there (docs/web-page.png)


@pytest.fixture(scope="module")
def page_server(server):
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=8)
    running = BackgroundServer(
        replace(loopback_config(engine_config), http_port=0), Engine(engine_config, server.engine.models, "")
    ).start()
    yield f"http://127.0.0.1:{running._state.http_port}"
    running.stop()


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Debian's chromium and chromium-driver are missing: run scripts/setup.sh --test")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1500",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _shown_image(driver) -> Image.Image:
    """The "after" image as the page shows it, read back through a canvas at its natural size."""
    encoded = driver.execute_script(
        """
        const img = document.getElementById("after-img");
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        canvas.getContext("2d").drawImage(img, 0, 0);
        return canvas.toDataURL("image/png").split(",")[1];
        """
    )
    return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")


def test_blur_t1_in_the_browser(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(page_server + "/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#method option[value=BLUR]"), timeout=30)
    Select(browser.find_element(By.ID, "method")).select_by_value("BLUR")
    browser.find_element(By.ID, "file").send_keys(str(t1_image_path()))
    browser.find_element(By.ID, "run").click()
    _wait(browser, lambda d: d.find_element(By.ID, "status").text in ("Done.", "Failed.", "Refused."))
    assert browser.find_element(By.ID, "status").text == "Done.", browser.find_element(By.ID, "error").text

    rows = browser.find_elements(By.CSS_SELECTOR, "#faces tbody tr")
    assert len(rows) == 6
    assert {row.find_elements(By.TAG_NAME, "td")[2].text for row in rows} == {"anonymized"}
    assert {row.find_elements(By.TAG_NAME, "td")[3].text for row in rows} == {"blur"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#after-frame .box")) == 6

    before = np.asarray(Image.open(t1_image_path()).convert("RGB"), dtype=np.float32)
    _wait(browser, lambda d: d.execute_script("return document.getElementById('after-img').complete"), timeout=30)
    assert browser.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
    after = np.asarray(_shown_image(browser), dtype=np.float32)
    assert after.shape == before.shape
    for row in rows:
        x0, y0, x1, y1 = (round(float(v)) for v in row.get_attribute("data-box").split(","))
        inside = np.abs(after[y0:y1, x0:x1] - before[y0:y1, x0:x1]).mean()
        assert inside > 3.0, f"box {x0, y0, x1, y1}: the output barely differs from the photo ({inside:.2f})"

    screenshot = tmp_path / "web-page.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_COPY):
        shutil.copy(screenshot, os.environ[SCREENSHOT_COPY])

    # A corrupt file: the page shows the server's own message, naming the field.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    browser.find_element(By.ID, "file").send_keys(str(broken))
    browser.find_element(By.ID, "run").click()
    _wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=60)
    message = browser.find_element(By.ID, "error").text
    assert "Bad Request" in message and "image: is not a recognised image" in message, message
    assert not browser.find_elements(By.CSS_SELECTOR, "#faces tbody tr")
