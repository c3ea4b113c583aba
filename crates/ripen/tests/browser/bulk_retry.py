"""A bulk retry of the failed entities the list's filter selects: the
button shows only with the failed filter, says how many it re-queued, and
the list follows them to ready."""
from common import *


def test(driver):
    open_view(driver, "/entities?status=ready")
    wait("the list", lambda: driver.find_elements(By.CSS_SELECTOR, "#entities"))
    assert not driver.find_elements(By.ID, "bulk-retry"), "no bulk retry without the failed filter"
    open_view(driver, "/entities?type=merchant&status=failed")
    wait("the failed merchants", lambda: set(rows(driver)) == set(CASE["failed"]))
    shot(driver, "before")
    driver.find_element(By.ID, "bulk-retry").click()
    n = len(CASE["failed"])
    wait("the confirmation", lambda: f"{n} of {n} failed entities re-queued" in text(driver, "#notice"))
    for eid in CASE["failed"]:
        wait(f"{eid} ready", lambda: get(f"/v1/entities/{eid}")["status"] == "ready", timeout=30)
    wait("the list to empty itself", lambda: driver.find_elements(By.ID, "empty"), timeout=30)
    shot(driver, "after")
    # Nothing left to retry: the same button says so.
    driver.find_element(By.ID, "bulk-retry").click()
    wait("the second confirmation", lambda: "0 of 0" in text(driver, "#notice"))


run(test)
