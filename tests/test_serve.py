"""training/serve.py: the JSON API (FastAPI's test client) answers as ``itmkit retrieve`` does, with
region labels and the query's parse; its limits (422, 400, 413, 404); uploads; that it writes
nothing and answers concurrent clients; and the page in headless Chromium (Selenium): a query
typed, result images loaded, a click showing captions, markup in a caption shown as text."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itmkit.cli import build_parser, main as itmkit
from pipeline import shards
from pipeline.shards import Layout
from training import serve

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT_CAPTION = 'a red circle <script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
MARKUP_FILE = '<img src=x onerror="window.__xss = 3">.png'


def serve_args(*argv):
    return build_parser(["serve"]).parse_args(["serve", *[str(a) for a in argv]])


def _rewrite_test_row(layout, kind: str, path, parity: int, column: str, value) -> dict:
    """Set ``column`` of the first test row whose image id has ``parity`` to ``value``, rewrite
    the table and register it again; returns the row."""
    rows = shards.read_table(path).to_pylist()
    row = next(r for r in rows if r["split"] == "test" and r["image_id"] % 2 == parity)
    row[column] = value
    shards.write_table(path, rows, kind)
    entry = layout.index.entries(kind)[0]
    layout.index.register(kind, path, rows=len(rows), config_hash=entry.config_hash)
    return row


@pytest.fixture(scope="module")
def site(labelled_run):
    """The labelled tiny run with markup in one caption and in one image's file name, served.
    Returns (root, run folder, labels, the image id of the caption with markup, the image id of
    the file name with markup, the app)."""
    root, run_dir, labels = labelled_run
    layout = Layout(root, "synth")
    target = _rewrite_test_row(layout, "captions", layout.captions, 0, "text", SCRIPT_CAPTION)
    odd = _rewrite_test_row(layout, "images", layout.images, 1, "path", MARKUP_FILE)
    runs = serve.load_runs(serve_args(run_dir, "--root", root, "--device", "cpu"))
    return root, run_dir, labels, target["image_id"], odd["image_id"], serve.make_app(runs)


@pytest.fixture(scope="module")
def client(site):
    from fastapi.testclient import TestClient
    return TestClient(site[-1])


def retrieve_json(*argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert itmkit(["retrieve", *[str(a) for a in argv], "--json", "--quiet"]) == 0
    return json.loads(out.getvalue())


def test_a_text_query_answers_as_retrieve_does_with_regions_and_its_parse(site, client):
    root, run_dir, labels, *_ = site
    r = client.get("/api/search", params={"q": "a red circle left of a zebra", "k": 5})
    assert r.status_code == 200
    (got,) = r.json()["runs"]
    want = retrieve_json(run_dir, "--root", root, "--query", "a red circle left of a zebra", "-k", 5)
    assert [x["image_id"] for x in got["results"]] == [x["image_id"] for x in want["results"]]
    assert np.allclose([x["score"] for x in got["results"]], [x["score"] for x in want["results"]], atol=1e-6)
    parse = got["parse"]
    assert parse["tokens"][:3] == ["a", "red", "circle"] and parse["unknown"] == ["zebra"]
    assert parse["reads_graph"] is False and parse["objects"] == []   # vsepp reads the words only
    for x in got["results"]:   # the most confident regions, with the names the shards' labels have
        assert x["regions"] and [g["label"] for g in x["regions"]] == labels[x["image_id"]][:len(x["regions"])]
        assert x["height"] > 0 and x["width"] > 0 and all(len(g["box"]) == 4 for g in x["regions"])


def test_a_dataset_caption_marks_its_image(site, client):
    root, run_dir, *_ = site
    caps = shards.read_table(Layout(root, "synth").captions).to_pylist()
    cap = next(c for c in caps if c["split"] == "test")
    (got,) = client.get("/api/search", params={"caption_id": cap["caption_id"], "k": 8}).json()["runs"]
    assert [x["image_id"] for x in got["results"] if x["ground_truth"]] == [cap["image_id"]]
    assert got["truth"] == [cap["image_id"]] and got["query"]["text"] == cap["text"]


def test_an_image_gets_its_regions_and_top_captions_with_its_own_marked(site, client):
    root, run_dir, labels, script_image, markup_image, _ = site
    d = client.get(f"/api/images/{script_image}", params={"k": 40}).json()
    assert d["image"]["file"] == f"{script_image}.png"
    assert [g["label"] for g in d["image"]["regions"]] == labels[script_image][:serve.BOXES]
    (captions,) = d["runs"]
    own = [x for x in captions["results"] if x["ground_truth"]]
    assert len(own) == 5 and all(x["image_id"] == script_image for x in own)
    assert SCRIPT_CAPTION in [x["text"] for x in own]
    assert client.get(f"/api/images/{markup_image}").json()["image"]["file"] == MARKUP_FILE


def test_thumbnails_are_jpegs_of_the_file_or_a_placeholder(site, client):
    root, run_dir, labels, script_image, markup_image, _ = site
    r = client.get(f"/api/images/{script_image}/thumb")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert max(im.size) == serve.THUMB and im.size == (320, 240)    # the 640x480 file the fixture drew
    colour = (30 * (script_image % 8), 120, 200)
    assert np.abs(np.asarray(im.convert("RGB"), float).mean((0, 1)) - colour).max() < 8
    grey = Image.open(io.BytesIO(client.get(f"/api/images/{markup_image}/thumb").content)).convert("RGB")
    assert np.median(np.asarray(grey), (0, 1)).tolist() == [200, 200, 200]


def test_limits_and_bad_requests(site, client):
    root, run_dir, labels, script_image, *_ = site
    assert client.get("/api/search", params={"q": "x" * 1001}).status_code == 422
    assert client.get("/api/search", params={"q": "a red circle " * 76}).status_code == 200   # 988 chars
    assert client.get("/api/search", params={"q": "a circle", "k": 101}).status_code == 422
    assert client.get("/api/search", params={"q": "a circle", "k": 0}).status_code == 422
    r = client.get("/api/search")
    assert r.status_code == 400 and "give one of q" in r.json()["detail"]
    r = client.get("/api/search", params={"caption_id": 10 ** 9})
    assert r.status_code == 400 and "no caption_id 1000000000" in r.json()["detail"]
    assert client.get("/api/images/123456/thumb").status_code == 404
    assert client.get("/api/images/0").status_code == 404                     # a train image: not served
    assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd/thumb").status_code in (404, 422)
    assert client.get(f"/api/images/{script_image}", params={"run": 1}).status_code == 404
    assert client.post("/api/upload", content=b"x" * (serve.MAX_UPLOAD + 1)).status_code == 413
    r = client.post("/api/upload", content=b"<html>not an image</html>", params={"name": "x.html"})
    assert r.status_code == 400 and r.json()["detail"].startswith("x.html: not an image")
    assert client.post("/api/upload", content=b"").status_code == 400


def test_the_api_page_and_the_page_need_nothing_from_outside(client):
    page, docs = client.get("/"), client.get("/docs")
    assert page.status_code == docs.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for text in (page.text, docs.text):   # nothing loaded from another host (the SVG namespace is a name)
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", text)
        assert text.replace("http://www.w3.org/2000/svg", "").count("http") == 0
    assert "/api/search" in docs.text and "maximum 100" in docs.text
    assert client.get("/openapi.json").json()["paths"]["/api/search"]["get"]


def test_an_uploaded_image_is_extracted_as_the_dataset_was(extracted_run):
    """An upload of a dataset image's file gets that image's captions and scores (random
    weights: the seed the shards record); the upload is written nowhere."""
    from fastapi.testclient import TestClient
    root, run_dir, rows = extracted_run
    client = TestClient(serve.make_app(serve.load_runs(serve_args(run_dir, "--device", "cpu"))))
    info = client.get("/api/runs").json()["runs"][0]
    assert info["uploads"] and info["random_weights"].startswith("RANDOM")
    image = next(r for r in rows if r["split"] == "test")
    before = tree(root)
    r = client.post("/api/upload", content=Path(image["path"]).read_bytes(), params={"k": 15, "name": "a.png"})
    assert r.status_code == 200, r.text
    (got,) = r.json()["runs"]
    (want,) = client.get(f"/api/images/{image['image_id']}", params={"k": 15}).json()["runs"]
    assert [x["caption_id"] for x in got["results"]] == [x["caption_id"] for x in want["results"]]
    assert got["query"] == {"kind": "file", "path": "a.png"}
    assert tree(root) == before


def tree(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


def test_a_cross_attention_run_is_bounded_or_shortlisted_and_runs_come_side_by_side(site, tmp_path):
    from fastapi.testclient import TestClient
    from training import train
    from training.config import RunConfig
    root, run_dir, *_ = site
    cross = tmp_path / "resg"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train.main(["--model", "resg", "--dataset", "synth", "--root", str(root), "--out", str(cross),
                           "--epochs", "1", "--set", "embed_dim=16", "--set", "word_dim=8", "--batch-size",
                           "20", "--workers", "0"]) == 0
    assert RunConfig.load(cross).model == "resg"
    bounded = TestClient(serve.make_app(serve.load_runs(serve_args(
        run_dir, cross, "--root", root, "--device", "cpu", "--block-images", 5))))
    runs = bounded.get("/api/runs").json()["runs"]
    assert [r["model"] for r in runs] == ["vsepp", "resg"]
    assert runs[0]["bounded"] is None and "first 5 of the split's 8 images" in runs[1]["bounded"]
    two = bounded.get("/api/search", params={"q": "a blue square", "k": 8}).json()["runs"]
    assert [len(a["results"]) for a in two] == [8, 5] and two[1]["parse"]["reads_graph"]
    for _ in range(10):   # drawn from the captions both runs search
        caption_id = bounded.get("/api/example", params={"run": 1}).json()["caption_id"]
        answers = bounded.get("/api/search", params={"caption_id": caption_id, "k": 3}).json()["runs"]
        assert "error" not in answers[1] and answers[1]["truth"] == answers[0]["truth"]
    assert [o["head"] for o in two[1]["parse"]["objects"]] == ["square"]   # resg reads the graph
    listed = TestClient(serve.make_app(serve.load_runs(serve_args(
        cross, "--root", root, "--device", "cpu", "--shortlist", run_dir, "--topk", 3))))
    (info,) = listed.get("/api/runs").json()["runs"]
    assert info["bounded"] is None and info["images"] == 8 and "re-scored" in info["method"]
    (a,) = listed.get("/api/search", params={"q": "a blue square", "k": 6}).json()["runs"]
    assert [x["rescored"] for x in a["results"]] == [True] * 3 + [False] * 3


def test_a_host_that_is_not_loopback_gets_a_warning(tmp_path, capsys):
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.4")
    assert itmkit(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "warning: binding 0.0.0.0, not loopback" in err and "not a run dir" in err


# ---------------------------------------------------------------------------------------------
# a live server: concurrent clients, and the page in a browser

@pytest.fixture(scope="module")
def live(site):
    """The app served by uvicorn on a free loopback port, in a thread. Yields its base URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(site[-1], log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_concurrent_clients_get_the_answers_of_one_client(live):
    queries = ["a red circle", "a blue square near a green star", "a yellow heart above a moon", "a ring"]

    def ask(q):
        with urllib.request.urlopen(f"{live}/api/search?k=8&q={urllib.parse.quote(q)}") as r:
            return [x["image_id"] for x in json.load(r)["runs"][0]["results"]]
    alone = {q: ask(q) for q in queries}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, queries * 10))
    assert together == [alone[q] for q in queries * 10]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1000", "--disable-background-networking", "--no-first-run"):
        options.add_argument(a)
    return webdriver.Chrome(options=options, service=Service(DRIVER))


@pytest.mark.skipif(not (CHROMIUM and DRIVER) and not os.environ.get("ITMKIT_REQUIRE_BROWSER"),
                    reason="chromium and chromium-driver are not installed (.ci/run installs them and sets "
                           "ITMKIT_REQUIRE_BROWSER=1: then the test runs and fails without them)")
def test_the_page_in_a_browser(live, site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    root, run_dir, labels, script_image, markup_image, _ = site
    k = 8
    driver = browser()
    try:
        driver.get(live + "/")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: "vsepp" in d.find_element(By.ID, "runs").text)
        assert "RANDOM (seed 0)" in driver.find_element(By.ID, "banners").text
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys("a red circle left of a zebra")
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys(str(k))
        driver.find_element(By.ID, "go").click()
        loaded = ("return [...document.querySelectorAll('.card img')]"
                  ".filter(i => i.complete && i.naturalWidth > 0).length")
        wait.until(lambda d: d.execute_script(loaded) >= k)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".card")) == k
        assert "zebra" in driver.find_element(By.CSS_SELECTOR, ".tok.unk").text
        assert driver.find_elements(By.CSS_SELECTOR, ".card svg text")          # region labels drawn
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".card .line.meta")]
        assert MARKUP_FILE in names                                              # a file name, as text
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("40")   # every caption of the split: its own 5 among them
        driver.find_element(By.CSS_SELECTOR, f'.card[data-image-id="{script_image}"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail li.gt"))
        own = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#detail li.gt")]
        assert len(own) == 5 and any(SCRIPT_CAPTION in t for t in own)
        assert driver.execute_script("return window.__xss") is None
        assert not driver.find_elements(By.CSS_SELECTOR, "#detail script, #results script, .card .line img")
        assert driver.execute_script("return document.querySelectorAll('script').length") == 1
        # an upload goes to every run; these shards record no config hash to check the extractor
        # weights against, so the run says so, as text
        upload = Path(root) / "synth" / f"{script_image}.png"
        driver.find_element(By.ID, "upload").send_keys(str(upload))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .column .error"))
        said = driver.find_element(By.CSS_SELECTOR, "#results .column .error").text
        assert "records no config hash" in said
        assert driver.find_element(By.CSS_SELECTOR, "#results .column h2").text.endswith(
            f"captions of {script_image}.png")
        shot = driver.get_screenshot_as_png()
        driver.get(live + "/?q=a%20blue%20square&k=3")   # a link to a query runs it
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 3)
        assert driver.find_element(By.ID, "q").get_attribute("value") == "a blue square"
        assert len(shot) > 10_000
        if os.environ.get("ITMKIT_SCREENSHOT"):
            Path(os.environ["ITMKIT_SCREENSHOT"]).write_bytes(shot)
    finally:
        driver.quit()
