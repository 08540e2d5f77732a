"""The patient's metadata as model input (``train.metadata``): its fixed encoding, a
model that learns from it, and every path that scores such a model: the model file,
the ONNX export and the prediction command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion import PipelineError, modelfile
from skinlesion.data import patient, patient_input
from skinlesion.deployment import export, runtime
from skinlesion.evaluation import explain, inference
from skinlesion.training import train
from tests.test_training import config, fit


def test_the_encoding_gives_unknown_and_blank_values_their_own_columns():
    frame = pd.DataFrame({"age": ["45", "", "nan"], "sex": ["male", "unknown", " Female"],
                          "localization": ["back", "lower extremity", "elbow"]})
    rows = patient.encode(frame, patient.encoding())
    assert rows.shape == (3, patient.width(patient.encoding())) == (3, 20) and rows.dtype == np.float32
    assert rows[0, :2].tolist() == pytest.approx([0.45, 0]) and rows[1, :2].tolist() == [0, 1] == rows[2, :2].tolist()
    assert rows[:, 2:5].tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]  # male, unknown, female
    sites = rows[:, 5:]
    assert sites[0, patient.SITES.index("back")] == sites[1, patient.SITES.index("lower extremity")] == 1
    assert sites[2, -1] == 1 and sites.sum(axis=1).tolist() == [1, 1, 1]  # "elbow" is no HAM10000 site: unknown
    assert patient.encode(frame.drop(columns="sex"), patient.encoding())[:, 4].tolist() == [1, 1, 1]


def site_data(rng, count: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Noise images whose class only the body site tells."""
    labels = np.arange(count) % 7
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    frame = pd.DataFrame({"age": rng.integers(20, 80, count).astype(str), "sex": rng.choice(["male", "female"], count),
                          "localization": [patient.SITES[label] for label in labels]})
    return images, labels, frame


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    rng = np.random.default_rng(0)
    (train_images, train_labels, train_frame), (val_images, val_labels, val_frame) = site_data(rng, 280), \
        site_data(rng, 70)
    spec = patient.encoding()
    plain = train.TrainData(train_images, train_labels, val_images, val_labels, "noise")
    fused = train.TrainData(train_images, train_labels, val_images, val_labels, "noise+site",
                            patient.encode(train_frame, spec), patient.encode(val_frame, spec))
    folder = tmp_path_factory.mktemp("patient")
    settings = {"epochs": 6, "augment": "none", "select": "balanced_accuracy"}
    without = fit(folder / "plain", config(**settings), data=plain)
    with_metadata = fit(folder / "fused", config(metadata=True, **settings), data=fused)
    return folder / "fused/model.pt", val_images, val_frame, val_labels, without, with_metadata


def test_a_metadata_model_learns_what_only_the_metadata_tells(learned):
    _, _, _, _, without, with_metadata = learned
    assert without["val_balanced_accuracy"] < 0.4  # noise images: near chance (1/7)
    assert with_metadata["val_balanced_accuracy"] > 0.9


def test_its_model_file_records_the_encoding_and_scoring_needs_the_metadata(learned):
    path, images, frame, labels, _, _ = learned
    model, info = modelfile.load(path)
    assert info.patient.dump() == patient.encoding()
    predictor = inference.TorchPredictor(model, info)
    rows = predictor.patient_rows(frame)
    predicted = predictor.probabilities(images, patient=rows).argmax(axis=1)
    assert (predicted == labels).mean() > 0.9
    with pytest.raises(PipelineError, match="takes the patient's metadata"):
        predictor.probabilities(images)
    masks = np.zeros(images.shape[:3], np.uint8)
    masks[:, 8:24, 8:24] = 1
    scored, _ = explain.score_split(model, info, images[:20], masks[:20], np.ones(20, bool), method="gradcam",
                                    batch_size=8, patient=rows[:20])
    assert [row["predicted"] for row in scored] == predicted[:20].tolist()
    assert all(0 <= row["energy_in_lesion"] <= 1 for row in scored)
    # Given the classes evaluate predicted, explain scores nothing again and explains the same classes.
    given, _ = explain.score_split(model, info, images[:20], masks[:20], np.ones(20, bool), method="gradcam",
                                   batch_size=8, patient=rows[:20], predicted=predicted[:20])
    assert given == scored


def test_its_onnx_export_takes_the_metadata_as_a_second_input(learned, tmp_path):
    path, images, frame, _, _, _ = learned
    model, info = modelfile.load(path)
    assert export.export(model, info, tmp_path / "model.onnx") < 1e-3
    session, described = runtime.load(tmp_path / "model.onnx")
    assert described.patient.dump() == patient.encoding()
    on_onnx = runtime.OnnxPredictor(session, described)
    rows = on_onnx.patient_rows(frame)
    onnx_p = on_onnx.probabilities(images, patient=rows)
    assert np.abs(onnx_p - inference.TorchPredictor(model, info).probabilities(images, patient=rows)).max() < 1e-4
    with pytest.raises(PipelineError, match="takes the patient's metadata"):
        on_onnx.probabilities(images)


def test_the_prediction_command_asks_for_the_metadata_csv(learned, tmp_path):
    path, images, frame, labels, _, _ = learned
    folder = tmp_path / "scans"
    folder.mkdir()
    ids = [f"ISIC_{i:07d}" for i in range(10)]
    for i, image_id in enumerate(ids):
        Image.fromarray(images[i]).save(folder / f"{image_id}.png")
    frame.iloc[:10].assign(image_id=ids).to_csv(tmp_path / "patients.csv", index=False)

    def predict(*extra):
        return subprocess.run([sys.executable, "-m", "skinlesion.predict", str(path), str(folder), "-o",
                               str(tmp_path / "out.csv"), *extra], capture_output=True, text=True)

    missing = predict()
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "takes the patient's metadata beside each image; give --metadata CSV" in missing.stderr
    assert not (tmp_path / "out.csv").exists()
    done = predict("--metadata", str(tmp_path / "patients.csv"))
    assert done.returncode == 0, done.stderr
    out = pd.read_csv(tmp_path / "out.csv").sort_values("image_id")
    assert (out["predicted"].to_numpy() == np.array(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])[labels[:10]]
            ).mean() >= 0.9
    frame.iloc[:9].assign(image_id=ids[:9]).to_csv(tmp_path / "short.csv", index=False)
    short = predict("--metadata", str(tmp_path / "short.csv"))
    assert short.returncode == 2 and "no row for 1 image(s), e.g. ISIC_0000009" in short.stderr
    (tmp_path / "out.csv").unlink()
    typo = frame.iloc[:10].assign(image_id=ids)
    typo.loc[2, "localization"] = "lower extremety"
    typo.to_csv(tmp_path / "typo.csv", index=False)
    refused = predict("--metadata", str(tmp_path / "typo.csv"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"--metadata {tmp_path / 'typo.csv'}, line 4 (ISIC_0000002): localization 'lower extremety' is not one " \
           f"of abdomen, " in refused.stderr
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("age, sex, site, problem", [
    ("45", "male", "back", None), ("", "", "", None), (" 7.5 ", "Female", "Lower Extremity", None),
    ("unknown", "unknown", "unknown", None), (None, None, None, None),
    ("forty", "", "", "age 'forty' is not a number of years from 0 to 120; leave it blank if unknown"),
    ("-1", "", "", "age '-1' is not a number of years"), ("121", "", "", "age '121' is not a number of years"),
    ("50", "f", "", "sex 'f' is not one of male, female or unknown"),
    ("50", "", "elbow", "localization 'elbow' is not one of abdomen, acral, back"),
])
def test_metadata_given_for_prediction_is_checked_before_it_is_encoded(age, sex, site, problem):
    # The encoding reads anything it does not know as unknown; at prediction time a
    # typo must not pass silently as "unknown".
    found = patient_input.describe_problem(age, sex, site, patient.encoding())
    assert found == problem if problem is None else found.startswith(problem)
