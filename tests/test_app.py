"""The local web page: its JSON endpoint answers like the prediction command (same
decoding, scoring and error lines) and survives bad uploads; in a real headless
Chromium, a dropped image shows its probabilities and Grad-CAM overlay, and a text
file named .jpg shows the error line."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinlesion import CLASSES, modelfile
from skinlesion.data import patient
from skinlesion.data.prepare import load_image
from skinlesion.evaluation import inference
from skinlesion.training import models
from tests.conftest import PROJECT
from tests.test_patient import learned  # noqa: F401 - a model whose class only the body site tells

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOT_AN_IMAGE = "notes.jpg is not an image (no format Pillow recognises)"  # the prediction command's line


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    head = {"hidden": 8, "dropout": 0}
    model = models.build("simple_cnn", num_classes=7, image_size=32, settings={}, head=head)
    folder = tmp_path_factory.mktemp("app_model")
    modelfile.save(folder / "trained.pt", model, architecture="simple_cnn", settings={}, head=head, classes=CLASSES,
                   image_size=32, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, training={})
    modelfile.with_scoring(folder / "trained.pt", folder / "model.pt",
                           {"tta": "flips", "tau": 0.0, "log_prior": None, "temperature": 1.0, "mel_threshold": 0.1})
    return folder / "model.pt"


@pytest.fixture()
def uploads(synthetic_folder, tmp_path) -> tuple[Path, Path]:
    image = sorted((synthetic_folder / "HAM10000_images_part_1").glob("*.jpg"))[0]
    text = tmp_path / "notes.jpg"
    text.write_text("a text file, renamed\n")
    return image, text


def post(url: str, data: bytes, name: str, **patient_values: str) -> tuple[int, dict]:
    headers = {"X-File-Name": name, "Content-Type": "application/octet-stream"}
    headers.update({f"X-{key.title()}": urllib.parse.quote(value) for key, value in patient_values.items()})
    request = urllib.request.Request(url + "api/predict", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def endpoint(model_path: Path):
    """The page's server for ``model_path`` in a thread of this process, on a free port; yields its URL."""
    from skinlesion.app import server

    httpd = server.serve(model_path, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_endpoint_answers_like_the_prediction_command_and_survives_bad_uploads(model_file, uploads, monkeypatch):
    from skinlesion.app import server

    image, text = uploads
    monkeypatch.setattr(server, "MAX_UPLOAD", 1 << 20)
    with endpoint(model_file) as url:
        status, answer = post(url, image.read_bytes(), "lesion%20one.jpg")
        assert status == 200 and answer["file"] == "lesion one.jpg"
        model, info = modelfile.load(model_file)
        expected = inference.TorchPredictor(model, info).probabilities(np.stack([load_image(image, 32)]))[0]
        got = np.array([answer["probabilities"][name] for name in CLASSES])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert answer["predicted"] == CLASSES[int(expected.argmax())]
        assert answer["melanoma"] == {"probability": pytest.approx(float(expected[4])), "threshold": 0.1,
                                      "flag": bool(expected[4] >= 0.1)}
        assert answer["overlay"].startswith("data:image/png;base64,")
        assert post(url, text.read_bytes(), "notes.jpg") == (422, {"file": "notes.jpg", "error": NOT_AN_IMAGE})
        status, answer = post(url, image.read_bytes()[:300], "../cut.jpg")
        assert status == 422 and answer["error"].startswith("cut.jpg is not a readable image (")
        status, answer = post(url, b"x" * (2 << 20), "huge.jpg")
        assert status == 413 and answer["error"] == "huge.jpg: 2.0 MB is over the 1 MB limit per image"
        with urllib.request.urlopen(url, timeout=30) as page:  # still serving
            assert "Research tool, not a diagnosis." in page.read().decode()


def browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -r requirements.txt)"
    return None


def test_the_endpoint_takes_the_patients_metadata_for_a_model_that_uses_it(learned):  # noqa: F811
    path, images, frame, labels, _, _ = learned
    model, info = modelfile.load(path)
    buffer = BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    with endpoint(path) as url:
        with urllib.request.urlopen(url + "api/info", timeout=30) as response:
            described = json.loads(response.read())
        assert described["patient"] == {"sex": list(patient.SEXES), "localization": list(patient.SITES),
                                        "max_age": 120}
        for site in ("chest", "face"):  # trained on the first seven sites, one per class
            status, answer = post(url, buffer.getvalue(), "scan.png", age="61", sex="Female", site=site)
            assert status == 200, answer
            assert answer["patient"] == {"age": "61", "sex": "female", "localization": site}
            row = patient.encode(pd.DataFrame([answer["patient"]]), info.patient.dump())
            expected = inference.TorchPredictor(model, info).probabilities(images[:1], patient=row)[0]
            np.testing.assert_allclose([answer["probabilities"][c] for c in CLASSES], expected, atol=1e-6)
            assert answer["predicted"] == CLASSES[patient.SITES.index(site)]  # the site decides, as trained
        status, answer = post(url, buffer.getvalue(), "scan.png")  # nothing given: all unknown
        assert status == 200 and answer["patient"] == {"age": "", "sex": "unknown", "localization": "unknown"}
        assert post(url, buffer.getvalue(), "scan.png", age="sixty") == (
            422, {"file": "scan.png", "error": "scan.png: age 'sixty' is not a number of years from 0 to 120; "
                                               "leave it blank if unknown"})
        status, answer = post(url, buffer.getvalue(), "scan.png", site="elbow")
        assert status == 422 and answer["error"].startswith("scan.png: localization 'elbow' is not one of abdomen")


@contextlib.contextmanager
def serving(model_file: Path):
    """The real command, serving on a free port of 127.0.0.1."""
    process = subprocess.Popen([sys.executable, "-m", "skinlesion.app", str(model_file), "--port", "0"], cwd=PROJECT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "SKINLESION_PROGRESS": "0"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=180)  # importing torch on a busy machine takes a while
    if not (lines and "http://127.0.0.1:" in lines[0]):
        process.kill()
        pytest.fail(f"the app did not start: {process.communicate()[1]}")
    try:
        yield lines[0].split(" on ", 1)[1].split()[0]
        assert process.poll() is None, "the server died"
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def chromium_page(url: str):
    """A page of Debian's headless Chromium, opened at ``url``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()


@pytest.fixture()
def app_url(model_file):
    with serving(model_file) as url:
        yield url


@pytest.mark.slow
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_a_person_drops_an_image_and_a_text_file_in_chromium(app_url, uploads, tmp_path):
    from playwright.sync_api import expect

    image, text = uploads
    with chromium_page(app_url) as page:
        expect(page.locator("#model")).to_contain_text("simple_cnn, 32 px")
        expect(page.get_by_text("Research tool, not a diagnosis.")).to_be_visible()
        expect(page.locator("#patient")).to_be_hidden()  # this model takes no metadata

        page.set_input_files("#files", str(image))
        card = page.locator(".result").first
        expect(card.locator("img.overlay")).to_be_visible(timeout=60_000)
        assert card.locator("img.overlay").evaluate("img => img.complete && img.naturalWidth") == 32
        bars = card.locator(".bar")
        expect(bars).to_have_count(len(CLASSES))
        shown = [float(bars.nth(i).get_attribute("data-probability")) for i in range(len(CLASSES))]
        assert sum(shown) == pytest.approx(1, abs=1e-4)
        predicted = card.locator(".predicted").inner_text()
        assert predicted == CLASSES[int(np.argmax(shown))]
        expect(card.locator(".melanoma")).to_contain_text("threshold 0.100")

        page.set_input_files("#files", str(text))
        error = page.locator(".result.failed .error")
        expect(error).to_have_text(f"error: {NOT_AN_IMAGE}", timeout=60_000)
        expect(page.locator(".result")).to_have_count(2)  # the first answer stays
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)


@pytest.mark.slow
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_a_person_gives_the_patients_age_sex_and_site_in_chromium(learned, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    path, images, _, _, _, _ = learned
    scan = tmp_path / "scan.png"
    Image.fromarray(images[0]).save(scan)
    with serving(path) as url, chromium_page(url) as page:
        expect(page.locator("#model")).to_contain_text("with the patient's age, sex and body site")
        expect(page.locator("#patient")).to_be_visible()
        page.fill("#age", "61")
        page.select_option("#sex", "female")
        page.select_option("#site", "chest")
        page.set_input_files("#files", str(scan))
        card = page.locator(".result").first
        expect(card.locator("img.overlay")).to_be_visible(timeout=60_000)
        expect(card.locator(".given")).to_have_text("with the patient's age 61, sex female, body site chest")
        expect(card.locator(".predicted")).to_have_text(CLASSES[patient.SITES.index("chest")])

        page.select_option("#site", "face")
        page.set_input_files("#files", str(scan))
        expect(page.locator(".result")).to_have_count(2)
        expect(page.locator(".result").first.locator(".predicted")).to_have_text(
            CLASSES[patient.SITES.index("face")], timeout=60_000)

        page.fill("#age", "200")
        page.set_input_files("#files", str(scan))
        expect(page.locator(".result.failed .error")).to_have_text(
            "error: scan.png: age '200' is not a number of years from 0 to 120; leave it blank if unknown",
            timeout=60_000)
        page.screenshot(path=str(tmp_path / "app_metadata.png"), full_page=True)


@pytest.mark.slow
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_a_generated_pattern_gets_the_out_of_scope_notice_in_chromium(tmp_path):
    from playwright.sync_api import expect

    from tests.test_scope import far_board, scoped_model_file

    target, _ = scoped_model_file(tmp_path)
    board = tmp_path / "board.png"
    Image.fromarray(far_board()).save(board)  # the blue-and-yellow checkerboard
    with serving(target) as url, chromium_page(url) as page:
        page.set_input_files("#files", str(board))
        card = page.locator(".result").first
        expect(card.locator(".scope")).to_contain_text(
            "does not look like the dermatoscopic images the model was trained on", timeout=60_000)
        expect(card.locator(".bar").first).to_be_hidden()  # no bars: the probabilities only on request
        expect(card.locator(".melanoma")).to_have_count(0)
        card.locator("details.probabilities summary").click()
        expect(card.locator(".bar")).to_have_count(len(CLASSES))
        expect(card.locator(".bar").first).to_be_visible()
