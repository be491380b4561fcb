"""Drives the registry dashboard in headless Chromium for testkit/tests/dashboard.rs.

Reads one JSON command per line on stdin and answers each with one line on
stdout: `DRIVER ok <json>` or `DRIVER error <message>`. The Rust test starts
and kills the node hosts; this script only looks at the page.

Commands (a JSON array, the name first):
  ["open", url]                          load url, wait until the page says live
  ["reload"]                             reload the page, wait until it says live
  ["wait_text", css, text, timeout_ms]   until an element matching css contains text;
                                         answers the wall-clock time (ms) it was seen
  ["wait_no_text", css, text, timeout_ms]
  ["text", css]                          the text of the first match
  ["count", css]                         how many elements match
  ["click", css, text]                   click the first match containing text
  ["type", css, text]                    replace an input's value (fires input events)
  ["eval", js]                           run `return (...)`, answer its value
  ["screenshot", path]
  ["severe"]                             browser console entries at level SEVERE so far
  ["quit"]
"""

import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def reply(ok, value):
    print("DRIVER " + ("ok " if ok else "error ") + json.dumps(value), flush=True)


def main():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,860"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    logs = []

    def drain_logs():
        logs.extend(driver.get_log("browser"))

    def texts(css):
        # One round trip for all matches, not one per element.
        return driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css)

    def until(check, timeout_ms, what):
        deadline = time.time() + timeout_ms / 1000
        while True:
            if check():
                return int(time.time() * 1000)
            if time.time() > deadline:
                raise TimeoutError(f"{what} not within {timeout_ms} ms")
            time.sleep(0.02)

    reply(True, "ready")
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            name, args = cmd[0], cmd[1:]
            if name == "open":
                driver.get(args[0])
                until(lambda: "live" in driver.find_element(By.ID, "status").text, 20000,
                      "status live")
                reply(True, driver.current_url)
            elif name == "reload":
                driver.refresh()
                until(lambda: "live" in driver.find_element(By.ID, "status").text, 20000,
                      "status live")
                reply(True, driver.current_url)
            elif name == "wait_text":
                css, text, timeout = args
                seen = until(lambda: any(text in t for t in texts(css)), timeout,
                             f"{text!r} in {css}")
                reply(True, seen)
            elif name == "wait_no_text":
                css, text, timeout = args
                seen = until(lambda: not any(text in t for t in texts(css)), timeout,
                             f"{text!r} gone from {css}")
                reply(True, seen)
            elif name == "text":
                found = driver.find_elements(By.CSS_SELECTOR, args[0])
                reply(True, found[0].text if found else None)
            elif name == "count":
                reply(True, len(driver.find_elements(By.CSS_SELECTOR, args[0])))
            elif name == "click":
                css, text = args
                # Found and clicked in one round trip: rows are redrawn live.
                clicked = driver.execute_script(
                    "const e = [...document.querySelectorAll(arguments[0])]"
                    ".find(e => e.textContent.includes(arguments[1]));"
                    "if (e) { e.click(); return e.textContent; } return null;", css, text)
                if clicked is None:
                    reply(False, f"no {css} containing {text!r}")
                else:
                    reply(True, clicked)
            elif name == "type":
                element = driver.find_element(By.CSS_SELECTOR, args[0])
                element.clear()
                element.send_keys(args[1])
                reply(True, args[1])
            elif name == "eval":
                reply(True, driver.execute_script("return (" + args[0] + ");"))
            elif name == "screenshot":
                driver.save_screenshot(args[0])
                reply(True, args[0])
            elif name == "severe":
                drain_logs()
                reply(True, [e for e in logs if e.get("level") == "SEVERE"])
            elif name == "quit":
                # Before answering: the test kills this script once it has
                # the answer, and a driver not quit by then leaves its
                # chromedriver (and Chromium) running.
                driver.quit()
                reply(True, "bye")
                return
            else:
                reply(False, f"unknown command {name!r}")
        except Exception as e:  # the test prints it and fails
            reply(False, f"{type(e).__name__}: {e}")
    driver.quit()


if __name__ == "__main__":
    main()
