"""A server with keys: the dashboard asks for one, says when it is refused,
keeps the one it was given for the tab, shows that tenant's entities only,
follows changes live with it, and forgets it on request."""
from selenium.webdriver.common.keys import Keys
from common import *


def key_box(driver):
    return wait("the key form", lambda: driver.find_element(By.ID, "api-key"))


def test(driver):
    open_view(driver, "/")
    key_box(driver)
    assert "API key" in text(driver, "main h1"), text(driver, "main h1")
    shot(driver, "asked")
    key_box(driver).send_keys("rpk_not-a-key" + Keys.ENTER)
    wait("the refusal", lambda: "refused the key" in text(driver, "#api-key-why"))
    key_box(driver).send_keys(CASE["acme_key"] + Keys.ENTER)
    wait("the counts table", lambda: driver.find_elements(By.CSS_SELECTOR, '#counts tr[data-type="merchant"]'))
    ready = wait("acme's one ready merchant", lambda: text(
        driver, '#counts tr[data-type="merchant"] td[data-status="ready"]') == "1")
    assert ready
    assert "default tenant only" in text(driver, "#rates-summary"), text(driver, "#rates-summary")
    wait("the live stream with the key", lambda: text(driver, "#live") == "● live")
    shot(driver, "overview")

    open_view(driver, "/entities")
    wait("acme's entity in the list", lambda: CASE["acme_entity"] in rows(driver))
    assert CASE["beta_entity"] not in rows(driver), rows(driver)
    open_view(driver, f"/entities/{CASE['beta_entity']}")
    wait("beta's entity is not found", lambda: CASE["beta_entity"] in text(driver, "#missing"))

    # The key stays for the tab: a reload does not ask again.
    driver.refresh()
    wait("the page again, without the form", lambda: driver.find_elements(By.ID, "forget-key"))
    assert not driver.find_elements(By.ID, "api-key")
    driver.find_element(By.ID, "forget-key").click()
    key_box(driver)
    assert driver.execute_script("return sessionStorage.getItem('ripen.apiKey')") is None


run(test)
