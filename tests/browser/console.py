"""Drives the comsat console in headless Chromium through chromedriver
(Selenium's WebDriver), as a person would: signs in with the admin's API
token, finds the demo link ready, saves a screenshot of the overview, signs
out; then signs in as a viewer and finds nothing to change, and a change
forged from that session (with its CSRF token) refused with 403.

Run by tests/console_browser.rs against a fleet it started; prints one
line per step and exits non-zero on the first that fails.
"""

import argparse
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as shown
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 30


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
    WebDriverWait(d, WAIT).until(shown.visibility_of_element_located((By.ID, "sign-in")))
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
    WebDriverWait(d, WAIT).until(shown.visibility_of_element_located((By.ID, "overview")))


def link_state(d, name):
    for row in d.find_elements(By.CSS_SELECTOR, "#links tbody tr"):
        cells = row.find_elements(By.TAG_NAME, "td")
        if cells and cells[0].text == name:
            return cells[1].text
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--admin-token-file", required=True)
    p.add_argument("--viewer-token-file", required=True)
    p.add_argument("--screenshots", required=True)
    p.add_argument("--chromedriver", required=True)
    p.add_argument("--chromium", required=True)
    args = p.parse_args()
    admin = open(args.admin_token_file).read().strip()
    viewer = open(args.viewer_token_file).read().strip()

    with tempfile.TemporaryDirectory() as profile:
        d = browser(args, profile)
        try:
            sign_in(d, args.url, admin)
            assert d.find_element(By.ID, "who").text == "user:admin"
            step("signed in as user:admin")
            WebDriverWait(d, WAIT).until(lambda d: link_state(d, "demo") == "ready")
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
            d.find_element(By.ID, "sign-out").click()
            WebDriverWait(d, WAIT).until(shown.visibility_of_element_located((By.ID, "sign-in")))
            d.get(args.url + "/ui")
            WebDriverWait(d, WAIT).until(shown.visibility_of_element_located((By.ID, "sign-in")))
            step("signed out, and a reload asks to sign in again")

            sign_in(d, args.url, viewer)
            WebDriverWait(d, WAIT).until(lambda d: link_state(d, "demo") == "ready")
            changes = d.find_elements(By.CSS_SELECTOR, "[data-change]")
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
