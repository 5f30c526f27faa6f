#!/usr/bin/env python3
"""Drive cellgate's dashboard in headless Chromium (Debian's chromium + chromium-driver).

  drive.py <admin base URL> <token> <cell to drain> <screenshot path>

Prints one JSON line: the cells the page listed, the drained cell's state on the page
before and after the click, and any error shown on the page.
"""
import json
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

base, token, cell, shot = sys.argv[1:5]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
          "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--window-size=1360,900", f"--user-data-dir={tempfile.mkdtemp()}"]:
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    wait = WebDriverWait(driver, 20)
    driver.get(base + "/ui")
    # The page asks for the token: type it into its dialog.
    tok = wait.until(EC.visibility_of_element_located((By.ID, "tok")))
    tok.send_keys(token)
    driver.find_element(By.ID, "tok-ok").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cell[data-cell]")) > 0)
    cells = [e.get_attribute("data-cell") for e in driver.find_elements(By.CSS_SELECTOR, ".cell[data-cell]")]
    state = lambda: driver.find_element(By.CSS_SELECTOR, f'.cell[data-cell="{cell}"] [data-state]').text
    before = state()
    driver.find_element(By.CSS_SELECTOR, f'button[data-act="drain"][data-cell="{cell}"]').click()
    # The dry-run plan is shown first; apply it.
    wait.until(EC.visibility_of_element_located((By.ID, "dlg-ok")))
    plan = driver.find_element(By.ID, "dlg-body").text
    driver.find_element(By.ID, "dlg-ok").click()
    wait.until(lambda d: state() == "draining")
    after = state()
    driver.save_screenshot(shot)
    print(json.dumps({"cells": cells, "before": before, "after": after, "plan": plan,
                      "error": driver.find_element(By.ID, "error").text}), flush=True)
finally:
    driver.quit()
