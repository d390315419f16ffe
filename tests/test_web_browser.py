"""The browser front end to end, in a real Chromium (Debian's chromium + chromium-driver, Selenium):
upload a CoNSeP patch, segment, read the counts, upload its ground truth, check the Dice against
`medseg evaluate` on the same pair, download the GeoJSON."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the web extra (gradio) is part of the test install")
from napari_medseg.io.images import read_label_map  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

STEM = "train_19_005"  # held out from the default model's training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """`medseg web` started as a user starts it, on a free local port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("web") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the page itself turns Gradio's usage reports off
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "napari_medseg", "web", "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            assert server.poll() is None, log.read_text()
            time.sleep(0.5)
    else:
        server.kill()
        raise AssertionError("medseg web did not answer within 120 s:\n" + log.read_text())
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver are installed by scripts/setup.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2050"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _upload(driver, elem_id: str, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def _table(driver, elem_id: str) -> list[list[str]]:
    """The rows a table shows (Gradio draws them as ARIA grid rows)."""
    rows = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} [role=row][data-index]")
    return [[c.text.strip() for c in r.find_elements(By.CSS_SELECTOR, "[role=gridcell]")] for r in rows]


def _evaluate_with_cli(consep: Path, tmp_path: Path) -> dict:
    """What `medseg predict` + `medseg evaluate` say about the same pair."""
    gt = tmp_path / "gt"
    for sub, name in (("images", f"{STEM}.png"), ("labels", f"{STEM}.tif"), ("instances", f"{STEM}.tif")):
        (gt / sub).mkdir(parents=True)
        shutil.copy(consep / sub / name, gt / sub / name)
    shutil.copy(consep / "classes.json", gt / "classes.json")
    medseg = [sys.executable, "-m", "napari_medseg"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([*medseg, "predict", str(gt / "images"), "--out", str(tmp_path / "pred")], check=True, env=env,
                   capture_output=True)
    subprocess.run([*medseg, "evaluate", str(tmp_path / "pred"), str(gt), "--json", str(tmp_path / "r.json")],
                   check=True, env=env, capture_output=True)
    return json.loads((tmp_path / "r.json").read_text())


def test_segment_compare_and_download_in_a_real_browser(page_url, browser, consep, tmp_path):
    wait = WebDriverWait(browser, 180)
    browser.get(page_url)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images input[type=file]")))
    _upload(browser, "images", consep / "images" / f"{STEM}.png")
    time.sleep(1.5)  # the upload reaches the server before the click
    browser.find_element(By.CSS_SELECTOR, "#segment").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "#status"), "nuclei"))
    overlay = browser.find_element(By.CSS_SELECTOR, "#overlay img")
    # the status can arrive before the browser has decoded the new picture: wait for its pixels
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    width = browser.execute_script("return arguments[0].naturalWidth", overlay)
    assert overlay.get_attribute("src") and width >= 256 and width % 256 == 0  # the 256² patch, enlarged whole
    wait.until(lambda d: any(r[0] == "all nuclei" for r in _table(d, "counts")))
    counts = {row[0]: row for row in _table(browser, "counts")}
    assert int(counts["all nuclei"][1]) > 20 and set(counts) >= {"inflammatory", "epithelial", "spindle"}
    assert "inflammatory" in browser.find_element(By.CSS_SELECTOR, "#legend").text

    _upload(browser, "ground-truth", consep / "labels" / f"{STEM}.tif")
    time.sleep(1.5)
    browser.find_element(By.CSS_SELECTOR, "#compare").click()
    wait.until(lambda d: any(r and r[0].startswith("nuclei") for r in _table(d, "metrics")))
    nuclei_row = next(r for r in _table(browser, "metrics") if r[0].startswith("nuclei"))
    expected = _evaluate_with_cli(consep, tmp_path)
    assert float(nuclei_row[2]) == pytest.approx(expected["overall"]["nucleus_dice"], abs=1e-4)
    # the page's untouched controls cut nuclei as `medseg predict` does: with the model's own settings
    predicted = read_label_map(tmp_path / "pred" / "instances" / f"{STEM}.tif")
    assert int(counts["all nuclei"][1]) == len(np.unique(predicted)) - 1
    assert browser.find_element(By.CSS_SELECTOR, "#errors img").get_attribute("src")

    link = next(a for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")
                if a.get_attribute("href") and "geojson" in a.get_attribute("href"))
    with urllib.request.urlopen(link.get_attribute("href")) as response:
        geojson = json.loads(response.read())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == int(counts["all nuclei"][1])
    shot = os.environ.get("MEDSEG_WEB_SCREENSHOT")  # README's picture: MEDSEG_WEB_SCREENSHOT=docs/web.png
    if shot:
        browser.save_screenshot(shot)


def test_a_bad_upload_gets_a_message_in_the_page(page_url, browser, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images input[type=file]")))
    _upload(browser, "images", bad)
    time.sleep(1.5)
    browser.find_element(By.CSS_SELECTOR, "#segment").click()
    wait.until(lambda d: "notes.png" in d.find_element(By.TAG_NAME, "body").text)
    assert "notes.png" in browser.find_element(By.TAG_NAME, "body").text


def test_switching_images_shows_each_ones_own_comparison(page_url, browser, consep):
    """Two images segmented, the first compared: choosing the second shows no metrics (they had
    stayed, the first image's, under the second's overlay); back to the first, its own again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.keys import Keys

    wait = WebDriverWait(browser, 180, ignored_exceptions=(StaleElementReferenceException,))  # tables redrawn
    browser.get(page_url)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images input[type=file]")))
    second = "train_12_001"
    browser.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(
        f"{consep / 'images' / f'{STEM}.png'}\n{consep / 'images' / f'{second}.png'}")
    time.sleep(1.5)
    browser.find_element(By.CSS_SELECTOR, "#segment").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "#status"), "Segmented 2 images"))
    _upload(browser, "ground-truth", consep / "labels" / f"{STEM}.tif")
    time.sleep(1.5)
    browser.find_element(By.CSS_SELECTOR, "#compare").click()
    wait.until(lambda d: any(r and r[0].startswith("nuclei") for r in _table(d, "metrics")))
    first_rows = wait.until(lambda d: _table(d, "metrics"))

    def choose(name):
        box = browser.find_element(By.CSS_SELECTOR, "#shown input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(name)
        box.send_keys(Keys.ENTER)

    choose(second)
    wait.until(lambda d: not any(r and r[0].startswith("nuclei") for r in _table(d, "metrics")))
    assert not browser.find_elements(By.CSS_SELECTOR, "#errors img[src]") or \
        not browser.find_element(By.CSS_SELECTOR, "#errors img").get_attribute("src")
    choose(STEM)
    wait.until(lambda d: _table(d, "metrics") == first_rows)
