"""On a phone (390 × 844), every view fits the width: no sideways scrolling."""
from common import *


def test(driver):
    open_view(driver, "/entities")
    assert driver.execute_script("return window.innerWidth") == 390
    wait("the list", lambda: len(rows(driver)) >= 10)
    no_sideways_scroll(driver)
    # Rows are stacked cards, each cell labelled.
    first = driver.find_element(By.CSS_SELECTOR, "#entities tbody tr td")
    assert driver.execute_script("return getComputedStyle(arguments[0]).display", first) == "block"
    shot(driver, "list")
    for fragment, ready in [
        ("/", "#counts"),
        (f"/entities/{CASE['degraded'][0]}", "#timeline"),
        (f"/entities/{CASE['pending'][0]}", "svg.dag"),
        ("/types", "svg.dag"),
    ]:
        open_view(driver, fragment)
        wait(fragment, lambda: driver.find_elements(By.CSS_SELECTOR, ready))
        no_sideways_scroll(driver)
        shot(driver, fragment.strip("/").split("/")[0] or "overview")


run(test, width=390, height=844, phone=True)
