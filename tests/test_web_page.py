"""The web page at GET /, driven in a real headless browser as a person would use it.

A tiny generated catalog is embedded and indexed (2 shards), the Serve app runs on a free local
port, and Debian's chromium (through the system chromedriver, driven by selenium) opens the page,
uploads photos through the file input and reads the result cards. Needs /usr/bin/chromium and
/usr/bin/chromedriver: run scripts/install_browser.sh (as root) to install them.
"""

from __future__ import annotations

import json
import pathlib
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import draw_product
from ports import free_port

from jobs import build_index, embed

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMEDRIVER = pathlib.Path("/usr/bin/chromedriver")
N_PRODUCTS = 12
K_DEFAULT = 10  # the page's default "results" choice
WAIT_S = 60
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1400",
]
CATEGORIES = ("shoes", "bags", "hats")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium; fails (never skips) when the browser or selenium is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: install the test browser with "
            "`sh scripts/install_browser.sh` (as root; apt-get install chromium chromium-driver)",
            pytrace=False,
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.fail(f"selenium is not installed ({exc}): pip install -e '.[test]'", pytrace=False)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager never looks for (or downloads) a driver.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-catalog")
    rows = []
    for i in range(N_PRODUCTS):
        pid = f"sku-{i:03d}"
        name = f"{pid}.jpg" if i % 2 else f"{pid}.png"
        img = draw_product(i, size=(160, 128))
        img.save(root / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        rows.append(
            {
                "product_id": pid,
                "image_uri": name,
                "title": f"Widget {i} ({CATEGORIES[i % 3]})",
                "category": CATEGORIES[i % 3],
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog.parquet")
    return root, rows


@pytest.fixture(scope="module")
def app_url(ray_local, catalog, tmp_path_factory):
    """Catalog -> embeddings -> 2-shard index -> the Serve app on a free port; yields its URL."""
    from ray import serve

    from serve.app import AppArgs, build_app

    root, _ = catalog
    work = tmp_path_factory.mktemp("web-work")
    emb = str(work / "embeddings")
    index_root = str(work / "index")
    embed.run(embed.Config(catalog=str(root / "catalog.parquet"), out=emb))
    manifest = build_index.run(build_index.Config(embeddings=emb, index_root=index_root, shards=2))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = AppArgs(index_root=index_root, embedder_cpus=0.5, shard_cpus=0.25, ingress_cpus=0.25)
        serve.run(build_app(args), name="vs", route_prefix="/")
        yield f"http://127.0.0.1:{port}/", manifest
    finally:
        serve.shutdown()


# ------------------------------------------------------------------------------ page helpers


def _diagnostics(driver) -> str:
    """What the page shows and logged, for failure messages."""
    try:
        status = driver.execute_script(
            "const s = document.getElementById('status');"
            "return [s.className, s.textContent, document.getElementById('meta').textContent];"
        )
        logs = [e["message"] for e in driver.get_log("browser")][-10:]
    except Exception as exc:  # the diagnostics must never hide the real failure
        return f"(no diagnostics: {exc})"
    return f"status={status[1]!r} (class {status[0]!r}), meta={status[2]!r}, console={logs}"


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    """Poll condition(driver) until it returns something truthy; fail with what the page shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except Exception as exc:
        pytest.fail(
            f"timed out after {timeout:.0f}s waiting for {what} ({type(exc).__name__}); "
            f"{_diagnostics(driver)}",
            pytrace=False,
        )


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(
        driver,
        lambda d: "loading" not in d.find_element("id", "meta").text,
        "the index line (GET /version)",
    )


def _upload(driver, path: pathlib.Path) -> None:
    """Choose a file in the (hidden) file input, as the 'choose a file' dialog would."""
    driver.find_element("css selector", "input#file").send_keys(str(path))


def _cards(driver) -> list[dict]:
    return driver.execute_script(
        """
        return [...document.querySelectorAll('#results .card')].map(c => ({
          product_id: c.dataset.productId,
          pid: c.querySelector('.pid').textContent,
          title: c.querySelector('.title').textContent,
          score: c.querySelector('.score').textContent,
          src: c.querySelector('img').getAttribute('src'),
          alt: c.querySelector('img').alt,
        }));
        """
    )


def _images_loaded(driver):
    """Scroll every result image into view (they load lazily); all decoded -> their widths."""
    widths = driver.execute_script(
        """
        const imgs = [...document.querySelectorAll('#results .card img')];
        for (const img of imgs) if (!img.complete) img.scrollIntoView({block: 'center'});
        return imgs.map(img => img.complete ? img.naturalWidth : -1);
        """
    )
    return widths if widths and all(w > 0 for w in widths) else False


# ------------------------------------------------------------------------------------ tests


def test_search_by_photo_shows_result_cards(browser, app_url, catalog, tmp_path):
    url, manifest = app_url
    root, rows = catalog
    titles = {r["product_id"]: r["title"] for r in rows}
    started = time.monotonic()

    _open(browser, url)
    assert browser.title == "visual_search"
    meta = browser.find_element("id", "meta").text
    assert f"index {manifest.version}" in meta, meta
    assert f"{N_PRODUCTS} images" in meta and manifest.model["model_id"] in meta, meta

    query = rows[5]
    _upload(browser, root / query["image_uri"])
    _wait(browser, lambda d: len(d.find_elements("css selector", ".card")) > 0, "result cards")
    status = browser.find_element("id", "status")
    assert status.get_attribute("class") == "", _diagnostics(browser)
    assert f"{K_DEFAULT} results in" in status.text, status.text
    assert f"index {manifest.version}" in status.text, status.text
    preview = browser.find_element("css selector", "#query img")
    assert preview.get_attribute("alt") == "query"

    widths = _wait(browser, _images_loaded, "every result image to load")
    cards = _cards(browser)
    assert len(cards) == len(widths) == K_DEFAULT, cards
    first = cards[0]
    assert first["product_id"] == first["pid"] == query["product_id"], cards
    for card in cards:
        pid = card["pid"]
        assert card["product_id"] == pid and pid in titles, card
        assert card["title"] == titles[pid] == card["alt"], card
        assert card["src"].startswith(f"/products/{pid}/image?id="), card
    scores = [float(c["score"]) for c in cards]
    assert all(c["score"] == f"{s:.3f}" for c, s in zip(cards, scores, strict=True)), cards
    assert scores == sorted(scores, reverse=True), scores
    assert scores[0] > 0.99, scores  # the query photo itself, cosine similarity ~1
    assert len({c["pid"] for c in cards}) == K_DEFAULT, cards
    # The images are the catalog's own files: each decodes at its original width.
    assert set(widths) == {160}, widths
    # The category the service predicts for this photo, above the grid.
    answer = requests.post(
        url + "search",
        files={"image": (query["image_uri"], (root / query["image_uri"]).read_bytes())},
        timeout=WAIT_S,
    ).json()
    assert answer["predicted_category"] in CATEGORIES, answer
    predicted = browser.find_element("id", "predicted")
    assert predicted.is_displayed()
    assert predicted.text == f"Category: {answer['predicted_category']}", predicted.text

    shot = tmp_path / "results.png"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(shot)), shot
    print(f"screenshot: {shot} ({time.monotonic() - started:.1f}s in the browser)")


def test_non_image_upload_shows_error_and_clears_results(browser, app_url, catalog, tmp_path):
    url, _ = app_url
    root, rows = catalog
    _open(browser, url)
    _upload(browser, root / rows[0]["image_uri"])
    _wait(browser, lambda d: len(d.find_elements("css selector", ".card")) > 0, "result cards")

    fake = tmp_path / "notes.png"  # a text file that only claims to be an image
    fake.write_text(json.dumps({"note": "this is not a photo"}) + "\n" * 10)
    _upload(browser, fake)
    status = _wait(
        browser,
        lambda d: (s := d.find_element("id", "status")).get_attribute("class") == "error" and s,
        "the error status line",
    )
    assert "not_an_image" in status.text, status.text
    assert browser.find_elements("css selector", ".card") == [], _cards(browser)
    assert browser.find_element("id", "results").get_attribute("innerHTML") == ""
    assert browser.find_element("id", "predicted").text == ""  # no stale prediction either
    shot = tmp_path / "error.png"
    assert browser.save_screenshot(str(shot)), shot
    print(f"screenshot: {shot}")


# ------------------------------------------------------------ text search, filters, coverage


def _type(driver, element_id: str, text: str) -> None:
    box = driver.find_element("id", element_id)
    box.clear()
    if text:
        box.send_keys(text)


def _text_search(driver, words: str) -> None:
    """Type words in the text box and submit it with Enter, as a person would."""
    from selenium.webdriver.common.keys import Keys

    _type(driver, "q", words)
    driver.find_element("id", "q").send_keys(Keys.ENTER)


def _requests_to(driver, fragment: str) -> int:
    """How many requests the page has sent whose URL contains fragment."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes(arguments[0])).length;",
        fragment,
    )


def _error_status(driver):
    return _wait(
        driver,
        lambda d: (s := d.find_element("id", "status")).get_attribute("class") == "error" and s,
        "the error status line",
    )


def _answer(driver, count: int, what: str) -> list[dict]:
    """Wait until the status line reports `count` results; the cards then."""
    _wait(
        driver,
        lambda d: d.find_element("id", "status").text.startswith(f"{count} results in"),
        what,
    )
    cards = _cards(driver)
    assert len(cards) == count, cards
    return cards


def test_text_search_shows_cards_for_a_title_word(browser, app_url, catalog):
    url, manifest = app_url
    _, rows = catalog
    bags = {r["product_id"] for r in rows if "bags" in r["title"]}
    _open(browser, url)

    _text_search(browser, "bags")
    cards = _answer(browser, len(bags), "the text search's cards")
    status = browser.find_element("id", "status")
    assert status.get_attribute("class") == "", _diagnostics(browser)
    assert f"index {manifest.version}" in status.text and "“bags”" in status.text, status.text
    assert {c["pid"] for c in cards} == bags, cards
    assert all("bags" in c["title"] and c["src"].startswith("/products/") for c in cards), cards
    answer = requests.get(url + "search", params={"q": "bags"}, timeout=WAIT_S).json()
    assert [c["pid"] for c in cards] == [r["product_id"] for r in answer["results"]], answer
    assert answer["coverage"] == {"shards": 2, "of": 2} and not answer["partial"], answer
    assert not browser.find_element("id", "coverage").is_displayed()  # every shard answered
    assert browser.find_element("id", "predicted").text == ""  # text answers predict nothing

    # Empty or too long text: a message on the page, and no request at all.
    sent = _requests_to(browser, "search?")
    _text_search(browser, "   ")
    assert "Type one or more words" in _error_status(browser).text
    assert browser.find_elements("css selector", ".card") == []
    browser.execute_script("document.getElementById('q').value = 'w'.repeat(501)")
    browser.find_element("css selector", "#text-form button").click()
    _wait(browser, lambda d: "at most 500" in d.find_element("id", "status").text, "too long")
    assert "501 characters" in browser.find_element("id", "status").text
    assert _requests_to(browser, "search?") == sent


def test_photo_with_words_is_a_hybrid_search(browser, app_url, catalog):
    url, _ = app_url
    root, rows = catalog
    query = rows[5]
    _open(browser, url)
    _type(browser, "q", "bags")  # typed, not submitted: the photo search takes the words along
    _upload(browser, root / query["image_uri"])
    cards = _answer(browser, K_DEFAULT, "the hybrid search's cards")
    status = browser.find_element("id", "status").text
    assert "for the photo and “bags”" in status, status
    assert _requests_to(browser, "q=bags") == 1
    answer = requests.post(
        url + "search",
        params={"q": "bags"},
        files={"image": (query["image_uri"], (root / query["image_uri"]).read_bytes())},
        timeout=WAIT_S,
    ).json()
    assert answer["fusion"]["method"] == "rrf", answer
    assert [c["pid"] for c in cards] == [r["product_id"] for r in answer["results"]], answer


def test_malformed_filter_shows_the_server_message(browser, app_url, catalog):
    url, _ = app_url
    root, rows = catalog
    _open(browser, url)
    for bad, search in (
        ("colour:red", lambda: _text_search(browser, "widget")),
        ("category<5", lambda: _upload(browser, root / rows[1]["image_uri"])),
    ):
        _type(browser, "filter", bad)
        search()
        status = _error_status(browser)
        answer = requests.get(url + "search", params={"q": "widget", "filter": bad}, timeout=WAIT_S)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert status.text == f"{error['code']}: {error['message']}", (status.text, error)
        assert repr(bad.split(":")[0].split("<")[0]) in error["message"], error
        assert browser.find_elements("css selector", ".card") == []
        _open(browser, url)  # a fresh page: the next bad filter must be the one shown


def test_filter_restricts_results_to_a_category(browser, app_url, catalog):
    url, _ = app_url
    root, rows = catalog
    by_category = {c: {r["product_id"] for r in rows if r["category"] == c} for c in CATEGORIES}
    _open(browser, url)

    # A photo of a bag, searched among hats only.
    photo = next(r for r in rows if r["category"] == "bags")
    _type(browser, "filter", "category:hats")
    _upload(browser, root / photo["image_uri"])
    cards = _answer(browser, len(by_category["hats"]), "the filtered photo search")
    assert {c["pid"] for c in cards} == by_category["hats"], cards
    assert all("(hats)" in c["title"] for c in cards), cards

    # "similar" on a hat, among shoes only: the filter applies to the click too.
    _type(browser, "filter", "category:shoes")
    hat = cards[0]
    browser.find_element(
        "css selector", f'.card[data-product-id="{hat["pid"]}"] button.similar'
    ).click()
    _wait(browser, lambda d: "similar to" in d.find_element("id", "status").text, "similar")
    cards = _answer(browser, len(by_category["shoes"]), "the filtered similar products")
    assert {c["pid"] for c in cards} == by_category["shoes"], cards

    # Words matching every title, among bags only (the "any of" syntax; no item is "nothing").
    _type(browser, "filter", "category:bags|nothing")
    _text_search(browser, "widget")
    _wait(browser, lambda d: "“widget”" in d.find_element("id", "status").text, "text search")
    cards = _answer(browser, len(by_category["bags"]), "the filtered text search")
    assert {c["pid"] for c in cards} == by_category["bags"], cards


def test_partial_answer_shows_a_coverage_notice(browser, app_url):
    """The page's own render() given a real answer marked partial (one shard left out): the
    service makes such answers only when a shard fails, which this module's app never does."""
    url, _ = app_url
    _open(browser, url)
    answer = requests.get(url + "search", params={"q": "widget"}, timeout=WAIT_S).json()
    assert answer["partial"] is False, answer
    browser.execute_script("render(arguments[0], '')", answer)
    assert not browser.find_element("id", "coverage").is_displayed()
    answer["partial"], answer["coverage"] = True, {"shards": 1, "of": 2}
    browser.execute_script("render(arguments[0], '')", answer)
    notice = browser.find_element("id", "coverage")
    assert notice.is_displayed() and "1 of 2 shards answered" in notice.text, notice.text
    assert len(_cards(browser)) == len(answer["results"])
