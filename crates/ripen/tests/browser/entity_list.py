"""The entity list: filters, cursor paging both ways, search by id and by
idempotency key, each view at its own URL."""
import datetime

from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select
from common import *


def listed(driver):
    wait("the results", lambda: driver.find_elements(By.CSS_SELECTOR, "#entities, #empty"))
    return rows(driver)


def test(driver):
    # Filters chosen in the form, applied with Enter, land in the URL.
    open_view(driver, "/entities")
    wait("the type choices", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#f-type option")) > 1)
    Select(driver.find_element(By.ID, "f-type")).select_by_value("merchant")
    Select(driver.find_element(By.ID, "f-status")).select_by_value("failed")
    driver.find_element(By.ID, "f-q").send_keys(Keys.ENTER)
    wait("the filtered URL", lambda: "type=merchant" in driver.current_url and "status=failed" in driver.current_url)
    wait("the failed merchants", lambda: set(listed(driver)) == set(CASE["failed"]))
    assert listed(driver) == sorted(CASE["failed"], reverse=True), "newest first"
    for badge in driver.find_elements(By.CSS_SELECTOR, "#entities tbody .badge"):
        assert badge.text == "failed", badge.text
    check_contrast(driver, "#entities .badge, #entities a, th, label")
    shot(driver, "failed")

    # Degraded only, by URL.
    open_view(driver, "/entities?degraded=true")
    wait("the degraded entities", lambda: set(listed(driver)) == set(CASE["degraded"]))
    assert all("degraded" in t for t in texts(driver, "#entities tbody td[data-label=status]"))

    # Created after: the entities created from the first pending one on,
    # from the millisecond in its id (what the filter compares with).
    ms = int(CASE["pending"][0].replace("-", "")[:12], 16)
    minted = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    created = minted.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    want = [e["id"] for e in list_all(f"created_after={created}")]
    assert set(want) == set(CASE["pending"] + CASE["cancelled"]), want
    open_view(driver, f"/entities?created_after={created}")
    wait("the entities created after", lambda: listed(driver) == want)
    value = driver.find_element(By.ID, "f-created_after").get_attribute("value")
    assert value, "the form shows the filter"

    # Paging, 2 at a time, through everything and back.
    open_view(driver, "/entities?limit=2")
    pages = [listed(driver)]
    while driver.find_elements(By.ID, "older"):
        previous = pages[-1]
        driver.find_element(By.ID, "older").click()
        wait("the next page", lambda: listed(driver) and listed(driver) != previous)
        pages.append(listed(driver))
        assert "after=" in driver.current_url
    seen = [i for p in pages for i in p]
    assert seen == CASE["all"], f"paged {seen} != {CASE['all']}"
    shot(driver, "last-page")
    for expected in reversed(pages[:-1]):
        driver.find_element(By.ID, "newer").click()
        wait("the previous page", lambda: listed(driver) == expected)
    assert not driver.find_elements(By.ID, "newer"), "the first page has no newer one"

    # Search by id: exactly that entity, whatever else was chosen.
    target = CASE["degraded"][0]
    open_view(driver, "/entities?status=failed")
    box = wait("the search box", lambda: driver.find_element(By.ID, "f-q"))
    box.send_keys(target)
    driver.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    wait("the entity by id", lambda: listed(driver) == [target])

    # Search by idempotency key, over every type.
    open_view(driver, f"/entities?q={CASE['key']}")
    wait("the entity by key", lambda: listed(driver) == [CASE["keyed"]])
    assert CASE["key"] in text(driver, "#results")
    shot(driver, "by-key")
    open_view(driver, "/entities?q=no-such-key")
    wait("nothing found", lambda: driver.find_elements(By.ID, "empty"))

    # A row links to its entity.
    open_view(driver, "/entities?type=account")
    wait("the accounts", lambda: listed(driver))
    driver.find_element(By.CSS_SELECTOR, "#entities tbody tr a").click()
    wait("the entity page", lambda: "/entities/" in driver.current_url and driver.find_elements(By.ID, "status"))


run(test)
