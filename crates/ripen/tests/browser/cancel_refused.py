"""Cancel on a page that still shows an entity pending, after it became
ready: the API's 409 is shown in the alert region, and the page catches up.

The page's live stream is blocked, so that it keeps showing what it read
first, as a page that has not heard of the change yet would. The entity is
submitted once the browser runs, so that a slow browser start cannot let
it settle before the page first reads it."""
from common import *


def test(driver):
    status, created = api("POST", "/v1/entities/brief", {"name": "brief"})
    assert status == 202, (status, created)
    eid = created["id"]
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events*"]})
    open_view(driver, f"/entities/{eid}")
    wait("the pending entity", lambda: "pending" in text(driver, "#status"))
    cancel = driver.find_element(By.ID, "cancel")
    wait("the entity to become ready on the server",
         lambda: get(f"/v1/entities/{eid}")["status"] == "ready", timeout=CASE["brief_ms"] / 1000 + 20)
    assert "pending" in text(driver, "#status"), "the page has not heard yet"
    cancel.click()
    alert = driver.find_element(By.ID, "alert")
    message = wait("the refusal", lambda: alert.text)
    assert alert.get_attribute("role") == "alert"
    status, problem = api("POST", f"/v1/entities/{eid}/cancel")
    assert status == 409, (status, problem)
    assert problem["detail"] in message, f"{message!r} does not say {problem['detail']!r}"
    assert problem["title"] in message, message
    check_contrast(driver, "#alert")
    wait("the page to catch up", lambda: "ready" in text(driver, "#status"))
    assert not driver.find_elements(By.ID, "cancel"), "cancel is gone once ready"
    assert "History could not be read" not in text(driver, "#alert")
    assert get(f"/v1/entities/{eid}")["status"] == "ready", "the refused cancel changed nothing"
    shot(driver, "refused")


run(test)
