"""The keyboard reaches every view: real links and buttons, in order, each
with a visible focus ring."""
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from common import *


def focused(driver):
    return driver.switch_to.active_element


def outline(driver, el):
    return driver.execute_script(
        "const s = getComputedStyle(arguments[0]); return [s.outlineStyle, s.outlineWidth]", el)


def tab(driver):
    ActionChains(driver).send_keys(Keys.TAB).perform()
    return focused(driver)


def test(driver):
    open_view(driver, "/")
    wait("the overview", lambda: driver.find_elements(By.CSS_SELECTOR, "#counts"))
    assert tab(driver).text == "Skip to content"
    names = [tab(driver).text for _ in range(4)]
    assert names == ["Ripen", "Overview", "Entities", "Types"], names
    el = focused(driver)
    style, width = outline(driver, el)
    assert style != "none" and width != "0px", f"no visible focus on {el.text}: {style} {width}"
    # Back to "Entities", and Enter follows it.
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    assert focused(driver).text == "Entities"
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    wait("the list", lambda: driver.current_url.endswith("#/entities") and rows(driver))
    assert focused(driver).get_attribute("id") == "main", "focus moves to the new view"
    assert driver.find_element(By.CSS_SELECTOR, '[data-nav="/entities"]').get_attribute("aria-current") == "page"
    # From the view, Tab reaches the filters, then the rows' links; Enter opens one.
    for _ in range(60):
        el = tab(driver)
        if el.tag_name == "a" and "/entities/" in (el.get_attribute("href") or ""):
            break
    else:
        raise AssertionError("Tab never reached an entity link")
    style, width = outline(driver, el)
    assert style != "none", f"no visible focus on the link: {style}"
    target = el.get_attribute("href").split("#")[1]
    shot(driver, "focus")
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    wait("the entity page", lambda: driver.current_url.endswith(target) and driver.find_elements(By.ID, "status"))
    # The skip button moves focus to the content, on a fresh load.
    driver.get("about:blank")
    open_view(driver, "/types")
    wait("the types", lambda: driver.find_elements(By.CSS_SELECTOR, "svg.dag"))
    skip = tab(driver)
    assert skip.text == "Skip to content"
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    assert focused(driver).get_attribute("id") == "main"


run(test)
