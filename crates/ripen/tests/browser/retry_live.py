"""Retry a failed entity from its page: it goes pending, then ready, as
the live stream reports it, without a reload."""
from common import *


def status(driver):
    return text(driver, "#status")


def test(driver):
    eid = CASE["failed"][0]
    open_view(driver, f"/entities/{eid}")
    wait("the failed entity", lambda: "failed" in status(driver))
    driver.execute_script("window.ripenMarker = 'same page'")
    shot(driver, "failed")
    driver.find_element(By.ID, "retry").click()
    wait("the retry's confirmation", lambda: "Retry accepted" in text(driver, "#notice"))
    wait("pending", lambda: "pending" in status(driver))
    wait("kyc running", lambda: driver.find_element(By.CSS_SELECTOR, 'g.node[data-step="kyc"]').get_attribute("data-status") == "running")
    assert not driver.find_elements(By.ID, "retry"), "retry is gone while pending"
    assert driver.find_element(By.ID, "cancel").is_displayed()
    shot(driver, "pending")
    wait("ready", lambda: "ready" in status(driver), timeout=30)
    kyc = driver.find_element(By.CSS_SELECTOR, 'g.node[data-step="kyc"]')
    assert kyc.get_attribute("data-status") == "succeeded"
    assert "succeeded" in [t.text for t in kyc.find_elements(By.TAG_NAME, "text")]
    assert driver.execute_script("return window.ripenMarker") == "same page", "the page was reloaded"
    # The attempts start again at 1 after the retry; both runs are shown.
    kyc_rows = driver.find_elements(By.CSS_SELECTOR, '#timeline tbody tr[data-step="kyc"]')
    assert [r.get_attribute("data-attempt") for r in kyc_rows] == ["1", "1"], [r.text for r in kyc_rows]
    assert "step_requeued" in [tr.get_attribute("data-kind") for tr in driver.find_elements(By.CSS_SELECTOR, "#history tbody tr")]
    wait("the data", lambda: driver.find_elements(By.CSS_SELECTOR, "#main details pre"))
    assert get(f"/v1/entities/{eid}")["status"] == "ready"
    shot(driver, "ready")


run(test)
