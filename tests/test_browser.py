"""The web page in real headless Chromium (Debian's ``chromium``; `.ci/run` installs it): upload a cub100
photo, see the predicted species and the heat-map overlay appear."""

import shutil
import sys

import pytest

from finegrain.data import load_dataset

from .conftest import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium; .ci/run does)")
def test_page_shows_species_and_overlay(cub10_checkpoint, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    index = load_dataset(cub10_checkpoint.parent.parent / "cub10.csv", val_fraction=0.0)
    photo = index.split("train")[0]
    species = index.classes[photo.label].split(".", 1)[1].replace("_", " ")
    cmd = [sys.executable, "-m", "finegrain", "serve", str(cub10_checkpoint)]
    with running_server(cmd) as base, playwright.sync_playwright() as p:  # a free port; fails if it never answers
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(f"{base}/")
        page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
        page.set_input_files("#file", str(photo.path))
        page.wait_for_selector("#result.shown", timeout=30_000)
        names = page.locator("#classes .name").all_text_contents()
        listed = page.locator("#class-list li").all_text_contents()
        docs_link = page.get_attribute("#about a[href='/docs']", "href")
        src = page.get_attribute("#overlay", "src")
        width = page.evaluate("document.getElementById('overlay').naturalWidth")
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert names[0] == species and len(names) == 5
    assert len(listed) == len(index.classes) and species in listed and docs_link == "/docs"
    assert src.startswith("data:image/png;base64,") and width > 100


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium; .ci/run does)")
def test_report_shows_the_learning_curves(cub, tiny_config, tmp_path):
    """The HTML report of a run, opened in Chromium: the learning curves picture is there and has loaded."""
    playwright = pytest.importorskip("playwright.sync_api")
    from finegrain.cli import main
    from finegrain.engine.train import fit

    run = fit(tiny_config(cub, epochs=2)).run_dir
    assert main(["evaluate", str(run), "--workers", "0", "--report"]) == 0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto((run / "report_test.html").as_uri())
        width = page.evaluate("document.getElementById('curves').naturalWidth")
        heading = page.locator("h2", has_text="Learning curves").count()
        browser.close()
    assert width > 400 and heading == 1
