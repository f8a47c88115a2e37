"""The page at / in a real headless Chromium: generate from the form, rate blind, see the summary; output is escaped."""
import os
import shutil

import pytest
from test_serve import JOKES, KEY, make_adapter

from peft_t5.bank import AdapterBank
from peft_t5.serve.app import ServeSettings, create_app, running

os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium would report usage over the network
os.environ.setdefault("SE_OFFLINE", "true")

if not (shutil.which("chromium") and shutil.which("chromedriver")):
    if os.environ.get("CI"):
        raise RuntimeError("CI needs chromium and chromium-driver (Debian packages; .ci/run installs them)")
    pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    bank = AdapterBank.load("tiny", {"jokes": make_adapter(root / "jokes", "jokes", 1),
                                     "squad": make_adapter(root / "squad", "squad", 2)})
    questions = [{"question": q, "answer": ""} for q in ["<b id='injected'>bold?</b>", *JOKES[:1]]]
    settings = ServeSettings(compile=False, api_key=KEY, rate_questions=questions, rate_systems=["base", "jokes"],
                             ratings=str(tmp_path_factory.mktemp("r") / "ratings.db"))
    with running(create_app(bank, settings)) as url:
        yield url, bank


def wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


@pytest.mark.slow
def test_page_generates_rates_blind_and_summarises(browser, site):
    url, bank = site
    browser.get(f"{url}/?key={KEY}")
    assert browser.current_url == f"{url}/"  # the key leaves the address bar (kept for this tab only)
    boxes = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#systems input"))
    assert [b.get_attribute("value") for b in boxes] == ["base", "jokes", "squad"]
    boxes[2].click()  # squad off: no context needed
    assert not browser.find_element(By.ID, "context-label").is_displayed()
    boxes[0].click()  # base on
    question = "<img src=x onerror=alert(1)>Why?"
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "generate").click()
    rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#outputs tbody tr"))
    shown = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text for r in rows}
    expected = bank.generate("jokes", [question])[0]
    assert shown["jokes"] == expected and set(shown) == {"base", "jokes"}
    assert browser.find_element(By.ID, "error").text == ""
    for field, value in (("temperature", "1.5"), ("candidates", "3")):  # sampled candidates, side by side
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "generate").click()
    rows = wait(browser, lambda d: [r for r in d.find_elements(By.CSS_SELECTOR, "#outputs tbody tr")
                                    if len(r.find_elements(By.TAG_NAME, "td")) == 4])
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#outputs thead th")]
    assert heads == ["system", "candidate 1", "candidate 2", "candidate 3"] and len(rows) == 2
    jokes = next(r for r in rows if r.find_elements(By.TAG_NAME, "td")[0].text == "jokes")
    assert len({td.text for td in jokes.find_elements(By.TAG_NAME, "td")[1:]}) > 1  # sampled, not one answer 3x

    browser.find_element(By.ID, "tab-rate").click()
    for _ in range(2):
        wait(browser, lambda d: d.find_element(By.ID, "rate-question").text not in ("", "saved"))
        items = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#rate-items tbody tr"))
        assert len(items) == 2
        question_text = browser.find_element(By.ID, "rate-question").text
        for i, (funny, ok) in enumerate([("5", "4"), ("2", "4")]):
            Select(browser.find_element(By.NAME, f"funny-{i}")).select_by_value(funny)
            Select(browser.find_element(By.NAME, f"appropriate-{i}")).select_by_value(ok)
        browser.find_element(By.ID, "submit-rating").click()
        wait(browser, lambda d: d.find_element(By.ID, "rate-question").text != question_text)
    wait(browser, lambda d: d.find_element(By.ID, "rate-question").text == "(all rated: thank you)")
    assert not browser.find_elements(By.ID, "injected")  # the question was shown as text, not as HTML

    browser.find_element(By.ID, "tab-summary").click()
    rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#summary-table tbody tr"))
    cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
    assert len(cells) == 4 and {c[0] for c in cells} == {"base", "jokes"}
    funny = {c[0]: c for c in cells if c[1] == "funny"}
    assert sum(float(c[2]) * int(c[4]) for c in funny.values()) == 2 * (5 + 2)  # each item: one 5, one 2
    assert all(c[4] == "2" for c in cells) and all(c[3] == "100%" for c in cells if c[1] == "appropriate")


def test_the_rate_tab_says_it_is_working_while_the_first_outputs_generate(browser, tmp_path, monkeypatch):
    import threading

    release = threading.Event()
    real = AdapterBank.generate_sources

    def held(self, *args, **kwargs):  # generation that waits until the test has looked at the page
        release.wait(60)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AdapterBank, "generate_sources", held)
    bank = AdapterBank.load("tiny", {"jokes": make_adapter(tmp_path / "jokes", "jokes", 1)})
    settings = ServeSettings(compile=False, api_key=KEY, rate_questions=[{"question": "Why?"}], ratings=str(tmp_path / "r.db"))
    with running(create_app(bank, settings)) as url:
        browser.get(f"{url}/?key={KEY}")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#systems input"))
        browser.find_element(By.ID, "tab-rate").click()
        status = wait(browser, lambda d: d.find_element(By.ID, "rate-status").text)
        assert status.startswith("generating the outputs to rate")
        assert not browser.find_element(By.ID, "submit-rating").is_enabled()
        release.set()
        wait(browser, lambda d: d.find_element(By.ID, "rate-question").text == "Why?")
        assert browser.find_element(By.ID, "rate-status").text == ""
        assert browser.find_element(By.ID, "submit-rating").is_enabled()


LONG = "Knock" + "knock" * 60  # 305 characters and no space: model output at its worst
OVERFLOW = """return [...document.querySelectorAll("body *")].filter((e) => e.getClientRects().length &&
    e.getBoundingClientRect().right > document.documentElement.clientWidth + 1).map((e) => e.id || e.tagName)
    .concat(document.documentElement.scrollWidth > document.documentElement.clientWidth ? ["page"] : []);"""


@pytest.mark.slow
def test_the_page_fits_390_and_1280_px_wide_and_an_error_replaces_the_table(browser, site, tmp_path):
    url, _ = site
    try:
        for width in (1280, 390):
            browser.set_window_size(width, 900)
            browser.get(f"{url}/?key={KEY}")
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#systems input"))
            assert not browser.find_element(By.ID, "outputs").is_displayed()  # no empty table before a reply
            browser.execute_script(  # three long candidates for each system, whatever the tiny model says
                "const real = window.fetch; window.fetch = (path, init) => path === '/v1/generate' ? "
                "Promise.resolve(new Response(JSON.stringify({outputs: [{output: arguments[0], candidates: "
                "[1, 2, 3].map((i) => ({output: arguments[0] + i}))}]}))) : real(path, init);", LONG)
            browser.find_element(By.ID, "question").send_keys("Who's there?")
            browser.find_element(By.ID, "candidates").clear()
            browser.find_element(By.ID, "candidates").send_keys("3")
            browser.find_element(By.ID, "generate").click()
            cells = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#outputs td.output"))
            assert len(cells) == 6 and all(c.is_displayed() for c in cells)  # jokes and squad, 3 candidates each
            assert [c.text for c in cells] == [LONG + str(i) for i in (1, 2, 3)] * 2  # wrapped, not cut
            tops = [c.rect["y"] for c in cells[:3]]
            assert (tops[0] < tops[1] < tops[2]) if width == 390 else (tops[0] == tops[1] == tops[2])  # stacked
            browser.save_screenshot(str(tmp_path / f"page-{width}.png"))
            assert browser.execute_script(OVERFLOW) == [], width

            browser.get(f"{url}/?key={KEY}")  # a fresh page (the real fetch), and a real error: temperature 5
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#systems input"))
            browser.find_element(By.ID, "question").send_keys("Why?")
            browser.find_element(By.ID, "temperature").clear()
            browser.find_element(By.ID, "temperature").send_keys("5")
            browser.find_element(By.ID, "generate").click()
            error = wait(browser, lambda d: d.find_element(By.ID, "error").text)
            assert error.startswith("temperature: ") and not browser.find_element(By.ID, "outputs").is_displayed()
            assert browser.execute_script(OVERFLOW) == [], width
    finally:
        browser.set_window_size(1280, 900)
