"""What the dashboard's browser tests share: a headless Chromium driven by
selenium, the API read directly, patient waits, screenshots and a few
accessibility checks.

Each script is run by crates/ripen/tests/dashboard.rs with RIPEN_URL (the
server), RIPEN_CASE (JSON: the ids of the entities it holds, by outcome) and
RIPEN_SHOTS (where screenshots go). A script passes by exiting 0.
"""
import json
import os
import shutil
import sys
import time
import traceback
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

BASE = os.environ["RIPEN_URL"].rstrip("/")
CASE = json.loads(os.environ.get("RIPEN_CASE") or "{}")
SHOTS = os.environ["RIPEN_SHOTS"]
NAME = os.path.splitext(os.path.basename(sys.argv[0]))[0]
PATIENCE = 20.0

# The screenshots of this script's last run only.
for old in os.listdir(SHOTS):
    if old.startswith(f"{NAME}-") and old.endswith(".png"):
        os.remove(os.path.join(SHOTS, old))


def api(method, path, body=None):
    """(status, JSON body) of one request to the server."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"accept": "application/json", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def get(path):
    status, body = api("GET", path)
    assert status == 200, f"GET {path}: {status} {body}"
    return body


def list_all(query):
    """Every entity view GET /v1/entities?{query} lists, page after page."""
    items, after = [], ""
    while True:
        page = get(f"/v1/entities?limit=1000&{query}{'&after=' + after if after else ''}")
        items += page["items"]
        if not page["next"]:
            return items
        after = page["next"]


def browser(width=1280, height=800, phone=False):
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ["--headless=new", "--no-sandbox", f"--window-size={width},{height}",
                "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US"]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    if phone:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 3, "mobile": True})
        driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True})
    driver.set_page_load_timeout(30)
    return driver


def shot(driver, what):
    path = os.path.join(SHOTS, f"{NAME}-{what}.png")
    driver.save_screenshot(path)
    print(f"screenshot {path}")
    return path


def wait(what, condition, timeout=PATIENCE):
    """The first truthy value of condition(), polled; fails saying `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (StaleElementReferenceException, WebDriverException, LookupError, AssertionError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(0.1)


def fresh(read, tries=20):
    """read(), again when the live view re-rendered the element under it."""
    for _ in range(tries - 1):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.05)
    return read()


def text(driver, css):
    return fresh(lambda: driver.find_element(By.CSS_SELECTOR, css).text)


def texts(driver, css):
    return fresh(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)])


def open_view(driver, fragment):
    driver.get(f"{BASE}/#{fragment}")


def rows(driver, table="#entities"):
    """The data-id of each row of an entity table, in order."""
    return [r.get_attribute("data-id") for r in driver.find_elements(By.CSS_SELECTOR, f"{table} tbody tr")]


def no_sideways_scroll(driver):
    width = driver.execute_script("return document.documentElement.scrollWidth")
    inner = driver.execute_script("return window.innerWidth")
    assert width <= inner, f"the page is {width}px wide in a {inner}px viewport"


CONTRAST_JS = """
function lum(c) {
  const [r, g, b] = c.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number).map(v => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
function bg(el) {
  for (; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor;
    if (c && !/rgba\\(.*, 0\\)$/.test(c) && c !== "transparent") return c;
  }
  return "rgb(255, 255, 255)";
}
return [...document.querySelectorAll(arguments[0])].filter(e => e.textContent.trim()).map(e => {
  const a = lum(getComputedStyle(e).color), b = lum(bg(e));
  return [e.textContent.trim().slice(0, 40), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
});
"""


def check_contrast(driver, css):
    """Every element matching css has text contrast of at least 4.5:1 (WCAG AA)."""
    pairs = driver.execute_script(CONTRAST_JS, css)
    assert pairs, f"nothing matches {css}"
    low = [(t, round(r, 2)) for t, r in pairs if r < 4.5]
    assert not low, f"contrast below 4.5:1: {low}"


def script_errors(driver):
    """Errors the page's own scripts raised (network refusals are not counted)."""
    return [e for e in driver.get_log("browser") if e.get("source") == "javascript"]


def run(test, **browser_args):
    """Runs test(driver) in a fresh browser; on failure, saves a screenshot
    and prints the console, then exits 1."""
    driver = browser(**browser_args)
    try:
        test(driver)
        errors = script_errors(driver)
        assert not errors, f"the page raised script errors: {errors}"
        print(f"{NAME}: passed")
    except BaseException:
        traceback.print_exc()
        try:
            shot(driver, "failure")
            for entry in driver.get_log("browser"):
                print("console:", entry, file=sys.stderr)
        except WebDriverException:
            pass
        driver.quit()
        sys.exit(1)
    driver.quit()
