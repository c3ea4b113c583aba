"""The entity page, opened by its URL: the DAG's nodes say each step's
status in text, the attempts are those of the history, with durations,
errors and retry times, and the data is shown only when ready."""
import datetime
from common import *


def nodes(driver):
    out = {}
    for g in driver.find_elements(By.CSS_SELECTOR, "svg.dag g.node"):
        labels = [t.text for t in g.find_elements(By.TAG_NAME, "text")]
        out[g.get_attribute("data-step")] = (g.get_attribute("data-status"), labels)
    return out


def check_dag(driver, view):
    got = wait("the DAG", lambda: nodes(driver))
    assert set(got) == {s["name"] for s in view["steps"]}, got
    for s in view["steps"]:
        status, labels = got[s["name"]]
        assert status == s["status"], f"{s['name']}: node {status}, view {s['status']}"
        assert labels == [s["name"], s["status"]], f"{s['name']}: labels {labels}"
    # Layers follow needs: a step is drawn right of what it needs.
    x = {g.get_attribute("data-step"): g.rect["x"] for g in driver.find_elements(By.CSS_SELECTOR, "svg.dag g.node")}
    for s in view["steps"]:
        for need in s["needs"]:
            assert x[need] < x[s["name"]], f"{need} is not drawn before {s['name']}"


def parse(t):
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))


def test(driver):
    # A degraded account: its first attempt of `open` failed and was retried.
    eid = CASE["degraded"][0]
    view = get(f"/v1/entities/{eid}")
    history = get(f"/v1/entities/{eid}/events")
    open_view(driver, f"/entities/{eid}")
    wait("the status", lambda: "ready" in text(driver, "#status"))
    assert "degraded" in text(driver, "#status") and "welcome" in text(driver, "#status")
    check_dag(driver, view)
    assert "No action applies" in text(driver, "#actions")

    started = [e for e in history if e["kind"] == "step_started"]
    wait("the attempts", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")) == len(started))
    trs = driver.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")
    for tr, ev in zip(trs, started):
        assert (tr.get_attribute("data-step"), int(tr.get_attribute("data-attempt"))) == (ev["step"], ev["attempt"])
        cell = lambda label: tr.find_element(By.CSS_SELECTOR, f'td[data-label="{label}"]').text
        assert cell("runs on") == "http", cell("runs on")
        assert cell("duration").endswith(" ms") or cell("duration").endswith(" s"), cell("duration")
    first = trs[0]
    failure = next(e for e in history if e["kind"] == "attempt_failed")
    assert first.find_element(By.CSS_SELECTOR, 'td[data-label="error"]').text == failure["error"]
    assert first.find_element(By.CSS_SELECTOR, 'td[data-label="outcome"]').text == "failed, retryable"
    due = next(e for e in history if e["kind"] == "retry_scheduled")["due_at"]
    shown = first.find_element(By.CSS_SELECTOR, 'td[data-label="next retry"] time').get_attribute("datetime")
    assert shown == due, f"next retry {shown} != {due}"
    ended = next(e for e in history if e["kind"] == "attempt_failed")["at"]
    ms = (parse(ended) - parse(started[0]["at"])).total_seconds() * 1000
    shown = first.find_element(By.CSS_SELECTOR, 'td[data-label="duration"]').text
    value, unit = shown.split(" ")
    value = float(value) * (1000 if unit == "s" else 1)
    assert abs(value - ms) <= max(0.5, ms / 100), f"duration {shown}, history {ms} ms"
    welcome = [tr for tr in trs if tr.get_attribute("data-step") == "welcome"][0]
    assert welcome.find_element(By.CSS_SELECTOR, 'td[data-label="outcome"]').text == "failed"

    wait("the history", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#history tbody tr")) == len(history))
    kinds = [tr.get_attribute("data-kind") for tr in driver.find_elements(By.CSS_SELECTOR, "#history tbody tr")]
    assert kinds == [e["kind"] for e in history], kinds

    # The data: the payload as text, never as markup, and each output.
    data = get(f"/v1/entities/{eid}/data")
    blocks = wait("the data", lambda: driver.find_elements(By.CSS_SELECTOR, "#main details pre"))
    payload = json.loads(blocks[0].get_attribute("textContent"))
    assert payload == data["payload"], payload
    assert not driver.find_elements(By.CSS_SELECTOR, "#main b"), "the payload's text became markup"
    summaries = texts(driver, "#main details summary")
    assert "output of open" in summaries, summaries
    check_contrast(driver, "#status .badge, #steps .badge, #timeline td, svg.dag text")
    driver.set_window_size(1280, 1800)
    shot(driver, "degraded")

    # A failed merchant: no data, and why; retry is offered.
    eid = CASE["failed"][0]
    open_view(driver, f"/entities/{eid}")
    wait("the failed entity", lambda: "failed" in text(driver, "#status"))
    check_dag(driver, get(f"/v1/entities/{eid}"))
    assert "it failed" in wait("why there is no data", lambda: text(driver, "#data-why"))
    assert driver.find_element(By.ID, "retry").is_displayed()
    assert not driver.find_elements(By.ID, "cancel")

    # A pending one: a running step and a blocked one; cancel is offered.
    eid = CASE["pending"][0]
    open_view(driver, f"/entities/{eid}")
    wait("the pending entity", lambda: "pending" in text(driver, "#status"))
    got = wait("the DAG", lambda: nodes(driver))
    assert got["hold"] == ("running", ["hold", "running"]), got
    assert got["after"] == ("blocked", ["after", "blocked"]), got
    assert driver.find_element(By.ID, "cancel").is_displayed()
    assert not driver.find_elements(By.ID, "retry")
    assert "still pending" in text(driver, "#data-why")
    shot(driver, "pending")

    # An unknown id says so.
    open_view(driver, "/entities/01a233a6-ee20-72be-b1c2-82b64fb86873")
    wait("the unknown entity", lambda: "No entity has the id" in text(driver, "#missing"))


run(test)
