"""The overview: its counts are the API's, and it follows new entities
live, without a reload."""
from common import *

STATUSES = ["pending", "ready", "failed", "cancelled"]


def page_counts(driver):
    return fresh(lambda: read_counts(driver))


def read_counts(driver):
    counts = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#counts tbody tr"):
        t = row.get_attribute("data-type")
        counts[t] = {s: int(row.find_element(By.CSS_SELECTOR, f'td[data-status="{s}"]').text) for s in STATUSES}
    return counts


def api_counts():
    return {t["type"]: t["counts"] for t in get("/v1/stats")["types"]}


def test(driver):
    open_view(driver, "/")
    wait("the counts table", lambda: driver.find_elements(By.CSS_SELECTOR, "#counts tbody tr"))
    counts = page_counts(driver)
    assert counts == api_counts(), f"page {counts} != stats {api_counts()}"
    # And the stats are what the list holds.
    for t, by_status in counts.items():
        for s in STATUSES:
            listed = len(list_all(f"type={t}&status={s}"))
            assert by_status[s] == listed, f"{t} {s}: page {by_status[s]}, list {listed}"
    assert counts["merchant"]["failed"] == len(CASE["failed"])
    assert counts["slow"]["cancelled"] == len(CASE["cancelled"])
    assert counts["slow"]["pending"] == len(CASE["pending"])
    total = {s: sum(c[s] for c in counts.values()) for s in STATUSES}
    summary = text(driver, "#counts-summary")
    assert summary == ", ".join(f"{total[s]} {s}" for s in STATUSES), summary
    created = len(CASE["failed"]) + len(CASE["degraded"]) + len(CASE["ready"]) + len(CASE["pending"]) + len(CASE["cancelled"])
    assert f"{created} created" in text(driver, "#rates-summary"), text(driver, "#rates-summary")
    assert len(driver.find_elements(By.CSS_SELECTOR, 'svg.bars[data-kind="created"] rect')) == 30
    # A count links to the list it counts.
    href = fresh(lambda: driver.find_element(
        By.CSS_SELECTOR, '#counts tr[data-type="merchant"] td[data-status="failed"] a').get_attribute("href"))
    assert href.endswith("#/entities?type=merchant&status=failed"), href
    check_contrast(driver, ".top a, #counts th, #counts a, .muted, figcaption, #rates-summary")
    shot(driver, "counts")

    wait("the live stream", lambda: text(driver, "#live") == "● live")
    driver.execute_script("window.ripenMarker = 'same page'")
    before = page_counts(driver)["merchant"]
    ids = [api("POST", "/v1/entities/merchant", {"name": f"live {i}"})[1]["id"] for i in range(3)]
    want = before["ready"] + 3
    wait("three more ready merchants on the page",
         lambda: page_counts(driver)["merchant"]["ready"] == want, timeout=30)
    # The stats are counted at most every 2 s: they catch up with the page.
    wait("the stats to agree with the page", lambda: page_counts(driver) == api_counts())
    assert page_counts(driver)["merchant"]["ready"] == want
    assert driver.execute_script("return window.ripenMarker") == "same page", "the page was reloaded"
    log = text(driver, 'ul.log')
    for i in ids:
        assert i in log, f"{i} is not among the recent changes: {log}"
    shot(driver, "live")


run(test)
