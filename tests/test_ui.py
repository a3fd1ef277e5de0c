"""``make ui`` in a real headless Chromium (Debian's, driven by Selenium) against a real TorchServe:
upload an image, see the drawn answer and the right count, slide the threshold, see the count
change, upload a text file, see the server's error. A screenshot is saved."""

from __future__ import annotations

import shutil

import pytest
import requests

from tests.conftest import post, synth_image

pytestmark = pytest.mark.server  # this file's layer (conftest.py: every test declares one)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("Chromium and chromedriver are missing: make browser (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def count_at(server, data: bytes, threshold: str) -> int:
    return len(post(server, "shapes", data, {"X-Response-Format": "detailed", "X-Threshold": threshold})
               .json()["detections"])


def test_page_upload_slider_error_screenshot(server, ui, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image = tmp_path / "scene.jpg"
    synth_image(5).save(image, quality=95)
    data = image.read_bytes()
    browser.get(ui)
    wait_for(browser, lambda d: "shapes" in [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")])
    assert "key" not in requests.get(f"{ui}/api/models", timeout=10).text.lower()  # the keys stay here

    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "model")).select_by_value("shapes")
    assert [o.text for o in Select(browser.find_element(By.ID, "version")).options] == ["default (1.0)", "1.0"]
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait_for(browser, lambda d: d.find_element(By.ID, "count").text.isdigit())
    assert '"model": "shapes"' in browser.find_element(By.ID, "json").text
    assert int(browser.find_element(By.ID, "count").text) == count_at(server, data, "0.5")
    drawn = browser.find_element(By.ID, "drawn")
    assert drawn.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", drawn) == synth_image(5).width
    assert browser.find_element(By.ID, "latency").text.endswith("ms")
    assert '"detections"' in browser.find_element(By.ID, "json").text

    low = count_at(server, data, "0.2")
    assert low > int(browser.find_element(By.ID, "count").text)
    browser.execute_script("const s = document.getElementById('threshold'); s.value = '0.2';"
                           "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));")
    wait_for(browser, lambda d: d.find_element(By.ID, "count").text == str(low))
    assert browser.find_element(By.ID, "threshold-value").text == "0.20"
    shot = tmp_path / "ui.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    browser.find_element(By.ID, "file").send_keys(str(text))
    wait_for(browser, lambda d: "not_an_image" in d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("415")
    assert browser.find_element(By.ID, "count").text == "-"
