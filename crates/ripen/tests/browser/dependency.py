"""An entity that waits for another: its page names the entity it depends
on, each blocked step says what it waits for, and once that entity is
cancelled the page shows, without a reload, the failure and its cause."""
from common import *


def test(driver):
    merchant, store = CASE["merchant"], CASE["store"]
    open_view(driver, f"/entities/{store}")
    row = "#steps tbody tr"
    wait("the blocked step and its reason",
         lambda: f"waiting for merchant {merchant}" in text(driver, row) and "blocked" in text(driver, row).lower())
    deps = text(driver, "#dependencies")
    assert merchant in deps and "merchant_id" in deps, deps
    href = fresh(lambda: driver.find_element(By.CSS_SELECTOR, "#dependencies a").get_attribute("href"))
    assert href.endswith(f"#/entities/{merchant}"), href
    check_contrast(driver, "#steps .reason")
    shot(driver, "waiting")
    status, view = api("POST", f"/v1/entities/{merchant}/cancel")
    assert status == 202, (status, view)
    wait("the failure", lambda: "failed" in text(driver, "#status"))
    wait("the failure's cause", lambda: "dependency_failed" in text(driver, "#failure"))
    assert merchant in text(driver, "#failure")
    wait("the skipped step's reason",
         lambda: f"merchant {merchant} cancelled" in text(driver, row))
    shot(driver, "failed")


run(test)
