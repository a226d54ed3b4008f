"""The dashboard's pages in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven through Selenium.

The site is opened from a file:// URL (the static site) and from
``fastsae dashboard --serve``'s server on the loopback address (live encoding). Each
test asserts what a person sees, and that the page logged no console error. The feature
page's screenshot is kept as a test artefact (``$FASTSAE_TEST_ARTIFACTS``, else the
test's temporary folder).

Without Chromium the tests skip, unless ``FASTSAE_REQUIRE_BROWSER=1`` (set by
``.ci/run``), where a missing browser fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from dashboard_testing import (
    CTX,
    D_SAE,
    DOCS,
    HOOK,
    LABELED,
    NP_ID,
    PROMPTS,
    build_dashboard,
    make_sae,
    minilm_tokenizer,
    tiny_model,
)

from fastsae.dashboard import data, explorer
from fastsae.dashboard.model import DashboardModel
from fastsae.dashboard.server import DashboardServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _require_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    missing = "chromium" if not CHROMIUM else "chromedriver"
    if os.environ.get("FASTSAE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"FASTSAE_REQUIRE_BROWSER=1 but {missing} is not on PATH")
    pytest.skip(f"{missing} is not installed (Debian packages chromium, chromium-driver)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tokenizer = minilm_tokenizer()
    model = tiny_model(tokenizer)
    sae = make_sae()
    base = tmp_path_factory.mktemp("dashboard")
    text = base / "docs.txt"
    text.write_text("\n".join(DOCS))
    tokens = data.load_token_rows(model.tokenizer, text_file=text, context_size=CTX)
    out = base / "site"
    index = build_dashboard(out, sae, model, tokens, base / "labels")
    return {"out": out, "index": index, "sae": sae, "model": model}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic", "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_for(driver, css: str, timeout: float = 10):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def wait_until(driver, predicate, timeout: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def rows(driver) -> list[int]:
    from selenium.webdriver.common.by import By

    return [
        int(r.get_attribute("data-index"))
        for r in driver.find_elements(By.CSS_SELECTOR, "#feature-table tr.feature-row")
    ]


def read_json(path: Path):
    return json.loads(path.read_text())


def test_feature_list_renders_searches_and_sorts(site, browser):
    from selenium.webdriver.common.by import By

    browser.get_log("browser")  # drop what an earlier test left
    browser.get(site["index"].as_uri() + "#/")
    wait_for(browser, "#feature-table tr.feature-row")
    assert rows(browser) == list(range(D_SAE))
    assert browser.find_element(By.ID, "feature-count").text == f"{D_SAE} of {D_SAE} features"
    label_cells = browser.find_elements(By.CSS_SELECTOR, "tr.feature-row td.label-cell")
    assert label_cells[2].text == LABELED[2] and label_cells[0].text == "(no label)"

    search = browser.find_element(By.ID, "search")
    search.send_keys("fox")  # label text
    wait_until(browser, lambda d: rows(d) == [2])
    assert browser.find_element(By.ID, "feature-count").text == f"1 of {D_SAE} features"
    search.clear()
    search.send_keys("STREAM")  # case-insensitive
    wait_until(browser, lambda d: rows(d) == [5])
    search.clear()
    search.send_keys("4")  # an index: 4 and 40-47
    wait_until(browser, lambda d: rows(d) == [4, *range(40, 48)])
    search.clear()
    search.send_keys("no such label")
    wait_until(browser, lambda d: rows(d) == [])
    search.clear()
    search.send_keys(" ")
    wait_until(browser, lambda d: len(rows(d)) == D_SAE)

    meta = read_json(site["out"] / "data" / "meta.json")
    by_max = sorted(meta["features"], key=lambda f: f["max_activation"], reverse=True)
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="max_activation"]').click()
    wait_until(browser, lambda d: rows(d)[:5] == [f["feature_index"] for f in by_max[:5]])
    shown = [next(f for f in meta["features"] if f["feature_index"] == i) for i in rows(browser)]
    assert [f["max_activation"] for f in shown] == sorted(
        (f["max_activation"] for f in meta["features"]), reverse=True
    )
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "sort")).select_by_value("frac_nonzero")
    densities = [f["frac_nonzero"] for f in meta["features"]]
    wait_until(
        browser,
        lambda d: [densities[i] for i in rows(d)] == sorted(densities, reverse=True),
    )
    assert console_errors(browser) == []


def test_feature_page_shows_label_contexts_and_highlight(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get_log("browser")
    browser.get(site["index"].as_uri() + "#/")
    wait_for(browser, "#feature-table tr.feature-row")
    browser.find_element(By.CSS_SELECTOR, 'tr.feature-row[data-index="2"] a').click()
    wait_for(browser, "#top-contexts")
    record = read_json(site["out"] / "data" / "features" / "2.json")
    assert browser.find_element(By.ID, "feature-title").text == "Feature 2"
    assert browser.find_element(By.ID, "feature-label").text == LABELED[2]
    link = browser.find_element(By.ID, "neuronpedia-link").get_attribute("href")
    assert link == f"https://www.neuronpedia.org/{NP_ID}/2"
    top = [a for a in record["activations"] if a["kind"] == "top"]
    contexts = browser.find_elements(By.CSS_SELECTOR, "#top-contexts .context")
    assert len(top) >= 3 and len(contexts) == len(top)
    for shown, want in zip(contexts, top, strict=True):
        tokens = shown.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(tokens) == len(want["tokens"])
        highlighted = shown.find_elements(By.CSS_SELECTOR, ".tok.max-tok")
        assert len(highlighted) == 1
        assert tokens.index(highlighted[0]) == want["max_value_token_index"]
        title = float(highlighted[0].get_attribute("title"))  # the value, 4 decimals
        assert title == pytest.approx(want["max_value"], abs=1e-4)
        # the activating token is coloured
        assert "background" in (highlighted[0].get_attribute("style") or "")
    quantiles = [a for a in record["activations"] if a["kind"] == "quantile"]
    shown_q = browser.find_elements(By.CSS_SELECTOR, "#quantile-contexts .context")
    assert len(shown_q) == len(quantiles) > 0
    bars = browser.find_elements(By.CSS_SELECTOR, "#activation-hist rect")
    assert len(bars) == len(record["freq_hist_data_bar_heights"])
    pos = browser.find_elements(By.CSS_SELECTOR, "#pos-logits tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, ".tok").text for r in pos] == [
        s.replace("\n", "\u21b5") for s in record["pos_str"]
    ]
    # next / previous, and a feature without data
    browser.find_element(By.ID, "next-feature").click()
    wait_until(browser, lambda d: d.find_element(By.ID, "feature-title").text == "Feature 3")
    assert browser.find_element(By.ID, "feature-label").text == "No label for this feature"
    errors_before = console_errors(browser)
    assert errors_before == []

    artefacts = Path(os.environ.get("FASTSAE_TEST_ARTIFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    browser.get(site["index"].as_uri() + "#/feature/2")
    wait_for(browser, "#top-contexts .context")
    shot = artefacts / "dashboard-feature-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    browser.get(site["index"].as_uri() + f"#/feature/{D_SAE + 5}")  # not in the dashboard
    wait_for(browser, "#feature-error")
    assert f"no data for feature {D_SAE + 5}" in browser.find_element(By.ID, "feature-error").text


def explorer_table(driver) -> list[tuple[str, list[int]]]:
    from selenium.webdriver.common.by import By

    out = []
    for row in driver.find_elements(By.CSS_SELECTOR, "#explorer-table tr.token-row"):
        chips = row.find_elements(By.CSS_SELECTOR, ".chip")
        out.append((row, [int(c.get_attribute("data-feature")) for c in chips]))
    return out


def test_static_explorer_shows_precomputed_prompts(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get_log("browser")
    browser.get(site["index"].as_uri() + "#/explorer")
    wait_for(browser, "#explorer-table")
    prompts = read_json(site["out"] / "data" / "prompts.json")
    assert [p["text"] for p in prompts] == PROMPTS
    Select(browser.find_element(By.ID, "prompt-select")).select_by_value("1")
    wait_until(browser, lambda d: len(explorer_table(d)) == len(prompts[1]["tokens"]))
    got = [features for _, features in explorer_table(browser)]
    assert got == [[f["feature"] for f in fs] for fs in prompts[1]["features"]]
    assert any(got)  # features do fire
    labelled = [f for fs in prompts[1]["features"] for f in fs if f["label"]]
    chips = browser.find_elements(By.CSS_SELECTOR, "#explorer-table .chip")
    if labelled:
        assert any(labelled[0]["label"] in c.text for c in chips)
    # clicking a token lists its features
    token_spans = browser.find_elements(By.CSS_SELECTOR, "#explorer-tokens .tok")
    assert len(token_spans) == len(prompts[1]["tokens"])
    firing = next(i for i, fs in enumerate(prompts[1]["features"]) if fs)
    token_spans[firing].click()
    detail = browser.find_elements(By.CSS_SELECTOR, "#token-features .chip")
    assert [int(c.get_attribute("data-feature")) for c in detail] == [
        f["feature"] for f in prompts[1]["features"][firing]
    ]
    # new text, no server: the page says how to get live encoding
    box = browser.find_element(By.ID, "prompt-input")
    box.clear()
    box.send_keys("Some text the dashboard was not built with.")
    browser.find_element(By.ID, "encode-button").click()
    wait_for(browser, "#explorer-message .message")
    assert "--serve" in browser.find_element(By.ID, "explorer-message").text
    assert explorer_table(browser) == []
    assert console_errors(browser) == []


def test_served_explorer_encodes_typed_text(site, browser):
    from selenium.webdriver.common.by import By

    dm = DashboardModel(site["model"], None, HOOK)
    encoder = explorer.PromptEncoder(site["sae"], dm, top_n=4)
    server = DashboardServer(site["out"], encoder, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get_log("browser")
        browser.get(server.url + "#/explorer")
        wait_until(
            browser, lambda d: "live" in d.find_element(By.ID, "live-status").text.split(":")[0]
        )
        text = "A lazy dog reads the residual stream of a quick fox."
        box = browser.find_element(By.ID, "prompt-input")
        box.clear()
        box.send_keys(text)
        browser.find_element(By.ID, "encode-button").click()
        want = encoder(text)
        wait_until(browser, lambda d: len(explorer_table(d)) == len(want["tokens"]))
        got = [features for _, features in explorer_table(browser)]
        assert got == [[f["feature"] for f in fs] for fs in want["features"]]
        assert any(got)
        # a chip of a feature in the dashboard links to its page
        link = browser.find_element(By.CSS_SELECTOR, "#explorer-table .chip a")
        link.click()
        wait_for(browser, "#top-contexts")
        assert browser.find_element(By.ID, "feature-title").text.startswith("Feature ")
        assert console_errors(browser) == []
    finally:
        server.shutdown()
        server.server_close()
