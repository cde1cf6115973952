"""Drives the comsat console in headless Chromium through chromedriver
(Selenium's WebDriver), as a person would: signs in with the admin's API
token, finds the demo link ready, saves a screenshot of the overview,
watches the demo link's bytes per second rise while a flow runs (the test
that runs this keeps one going) and saves a screenshot of it,
creates a link and sees it ready, changes its limits, deletes it, creates
a join token (shown once with its enrol command), signs out; then signs
in as a viewer and finds nothing to change, and a change forged from that
session (with its CSRF token) refused with 403.

Run by tests/console_browser.rs against a fleet it started; prints one
line per step and exits non-zero on the first that fails.
"""

import argparse
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as shown
from selenium.webdriver.support.ui import Select, WebDriverWait

WAIT = 30


def wait(d):
    """Waits up to WAIT seconds, looking again when the page rebuilt what
    was found (its tables refresh every 2 s)."""
    return WebDriverWait(d, WAIT, ignored_exceptions=(StaleElementReferenceException,))


def browser(args, profile):
    o = Options()
    o.binary_location = args.chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1366,900",
        # The controller's certificate is from its own CA, which this
        # throw-away profile does not hold.
        "--ignore-certificate-errors",
        f"--user-data-dir={profile}",
    ):
        o.add_argument(flag)
    return webdriver.Chrome(service=Service(args.chromedriver), options=o)


def step(what):
    print(f"ok: {what}", flush=True)


def sign_in(d, url, token):
    d.get(url + "/ui")
    wait(d).until(shown.visibility_of_element_located((By.ID, "sign-in")))
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
    wait(d).until(shown.visibility_of_element_located((By.ID, "overview")))


def link_state(d, name):
    for row in d.find_elements(By.CSS_SELECTOR, "#links tbody tr"):
        cells = row.find_elements(By.TAG_NAME, "td")
        if cells and cells[0].text == name:
            return cells[1].text
    return None


def row(d, name):
    for r in d.find_elements(By.CSS_SELECTOR, "#links tbody tr"):
        cells = r.find_elements(By.TAG_NAME, "td")
        if cells and cells[0].text == name:
            return r
    return None


def click_in_row(d, name, text):
    def click(d):
        r = row(d, name)
        if r is None:
            return False
        r.find_element(By.XPATH, f".//button[text()='{text}']").click()
        return True

    wait(d).until(click)


def fill(form, values):
    for name, value in values.items():
        field = form.find_element(By.NAME, name)
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(value)


def moving(d, name):
    """Whether link `name`'s traffic cell shows bytes per second moving."""
    r = row(d, name)
    if r is None:
        return False
    text = r.find_elements(By.TAG_NAME, "td")[5].text
    return "/s" in text and not ("↑ 0 B/s" in text and "↓ 0 B/s" in text)


def links_and_tokens(d, args):
    """Creates link `web`, changes its limits, deletes it; makes a token."""
    d.find_element(By.CSS_SELECTOR, "#new-link summary").click()
    form = d.find_element(By.ID, "new-link-form")
    fill(form, {"name": "web", "from": "a", "listen": args.listen, "to": "b", "target": args.target})
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(d).until(lambda d: link_state(d, "web") == "ready")
    step("created link web, and it shows ready")

    click_in_row(d, "web", "Limits")
    limits = wait(d).until(lambda d: row(d, "web").find_element(By.CSS_SELECTOR, "form.limits"))
    fill(limits, {"max_flows": "5"})
    limits.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(d).until(
        lambda d: row(d, "web") is not None
        and row(d, "web").find_elements(By.TAG_NAME, "td")[6].text == "5 flows"
    )
    step("changed web's limits to 5 flows")

    click_in_row(d, "web", "Delete")
    wait(d).until(shown.alert_is_present()).accept()
    wait(d).until(lambda d: row(d, "web") is None)
    step("deleted link web")

    form = d.find_element(By.ID, "audit-form")
    fill(form, {"subject": "user:admin", "result": "ok"})
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    def audited(d):
        rows = [
            [c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in d.find_elements(By.CSS_SELECTOR, "#audit-log tbody tr")
        ]
        actions = {r[2] for r in rows if len(r) == 6}
        only = all(len(r) == 6 and r[1] == "user:admin" and r[4] == "ok" for r in rows)
        return only and {"link.create", "link.update", "link.delete"} <= actions

    wait(d).until(audited)
    step("the audit log, filtered to user:admin and ok, shows the link's creation, change and deletion")

    d.find_element(By.CSS_SELECTOR, "#new-token summary").click()
    form = d.find_element(By.ID, "new-token-form")
    fill(form, {"kind": "agent", "name": "edge-x"})
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(d).until(shown.visibility_of_element_located((By.ID, "token-shown")))
    command = d.find_element(By.ID, "token-command").text
    assert command.startswith("comsat agent enrol --token-file edge-x.token"), command
    assert len(d.find_element(By.ID, "token-value").text) > 40
    step("created a join token for edge-x, shown with its enrol command")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--admin-token-file", required=True)
    p.add_argument("--viewer-token-file", required=True)
    p.add_argument("--screenshots", required=True)
    p.add_argument("--chromedriver", required=True)
    p.add_argument("--chromium", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    args = p.parse_args()
    admin = open(args.admin_token_file).read().strip()
    viewer = open(args.viewer_token_file).read().strip()

    with tempfile.TemporaryDirectory() as profile:
        d = browser(args, profile)
        try:
            sign_in(d, args.url, admin)
            assert d.find_element(By.ID, "who").text == "user:admin"
            step("signed in as user:admin")
            wait(d).until(lambda d: link_state(d, "demo") == "ready")
            step("the demo link shows ready")
            cookie = d.get_cookie("comsat_session")
            assert cookie is not None, "no session cookie"
            assert cookie["httpOnly"] and cookie["secure"], cookie
            assert cookie.get("sameSite") == "Strict", cookie
            assert d.execute_script("return document.cookie") == "", "the page can read the cookie"
            assert admin not in d.page_source, "the page holds the token"
            step("the session cookie is HttpOnly, Secure, SameSite=Strict; the token is not in the page")
            d.save_screenshot(f"{args.screenshots}/overview.png")
            step("saved overview.png")
            wait(d).until(lambda d: moving(d, "demo"))
            traffic = row(d, "demo").find_elements(By.TAG_NAME, "td")[5]
            assert traffic.find_elements(By.CSS_SELECTOR, "svg.spark polyline"), "no sparkline"
            step(f"the demo link's bytes per second rise while a flow runs: {traffic.text}")
            row(d, "demo").screenshot(f"{args.screenshots}/link-under-traffic.png")
            d.save_screenshot(f"{args.screenshots}/overview-under-traffic.png")
            step("saved link-under-traffic.png")
            links_and_tokens(d, args)
            d.find_element(By.ID, "sign-out").click()
            wait(d).until(shown.visibility_of_element_located((By.ID, "sign-in")))
            d.get(args.url + "/ui")
            wait(d).until(shown.visibility_of_element_located((By.ID, "sign-in")))
            step("signed out, and a reload asks to sign in again")

            sign_in(d, args.url, viewer)
            wait(d).until(lambda d: link_state(d, "demo") == "ready")
            changes = d.find_elements(By.CSS_SELECTOR, "[data-change]")
            assert len(changes) >= 4, "the page has no change controls at all"
            assert all(not e.is_displayed() for e in changes), "a viewer is offered a change"
            step("a viewer sees the fleet and is offered no change")
            status = d.execute_async_script(
                """
                const done = arguments[arguments.length - 1];
                (async () => {
                  const s = await (await fetch("/ui/session")).json();
                  const r = await fetch("/v1/links", {
                    method: "POST",
                    headers: {"Content-Type": "application/json", "X-CSRF-Token": s.csrf},
                    body: JSON.stringify({name: "forged", from: "a", listen: "tcp://127.0.0.1:7999",
                                          to: "b", target: "tcp://127.0.0.1:9"}),
                  });
                  done(r.status);
                })().catch((e) => done(String(e)));
                """
            )
            assert status == 403, f"a forged change answered {status}"
            step("a change forged from the viewer's session, with its CSRF token, gets 403")
        finally:
            d.quit()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line for the Rust test's message
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
