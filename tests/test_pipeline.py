"""The real DVC pipeline in a throwaway git repository, on synthetic data: it builds,
each param reruns only what depends on it, outputs are byte-stable, and the run
cache hits."""

from __future__ import annotations

import json
import re
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import make_project, run, set_params

pytestmark = pytest.mark.slow  # real git+DVC projects and processes

AFTER_TRAIN = ["calibrate", "export", "evaluate", "external", "scope", "card", "explain"]
TRAIN = "train@42"  # the one member of the default ensemble.seeds
STAGES = ["download", "prepare", "split", "balance", TRAIN, *AFTER_TRAIN]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@]+)'", output)


def outs(project) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


@pytest.fixture(scope="module")
def project(synthetic_zips, tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("pipeline") / "project", synthetic_zips)
    result = run(["dvc", "repro"], root)
    assert ran(result.stdout) == STAGES
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
    return root


def test_first_repro_builds_every_data_artifact(project, synthetic_zips):
    for path in ["data/raw/metadata.csv", "data/prepared/images.npy", "data/split/test.csv",
                 "data/balanced/images.npy", "data/balanced/train.csv",
                 "plots/split/class_distribution.png", "plots/balance/augmented_montage.png"]:
        assert (project / path).is_file(), path
    split = json.loads((project / "plots/split/summary.json").read_text())
    assert split["shared_lesions"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    balance = json.loads((project / "plots/balance/summary.json").read_text())
    assert set(balance["after"].values()) == {12} and balance["images"] == 84
    assert ran(run(["dvc", "repro"], project).stdout) == []  # a second repro is a no-op


def test_balance_param_reruns_balance_and_train_only(project):
    before = outs(project)
    set_params(project, {"balance.target_per_class": 9})
    status = run(["dvc", "status", "--json"], project).stdout
    assert set(json.loads(status)) == {"balance"}
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) == ["balance", TRAIN, *AFTER_TRAIN]
    after = outs(project)
    changed = {path for path in after if after[path] != before[path]}
    assert changed == {"data/balanced", "plots/balance/summary.json", "plots/balance/augmented_montage.png",
                       "models/members/42.pt", "models/model.pt", "models/model.onnx", "metrics/calibrate.json",
                       "plots/calibrate/tau_search.csv", "metrics/train/42/metrics.json", "metrics/train/42/plots",
                       "models/MODEL_CARD.md", "plots/evaluate", "metrics/evaluate.json", "data/evaluate/scope_scores.npz",
                       "plots/scope", "metrics/scope.json", "plots/explain", "metrics/explain.json"}
    assert json.loads((project / "plots/balance/summary.json").read_text())["images"] == 63

    # Back to the committed value: the run cache restores every stage without running it.
    run(["git", "checkout", "params.yaml"], project)
    result = run(["dvc", "repro"], project)
    assert ran(result.stdout) == []
    for stage in ["balance", TRAIN, *AFTER_TRAIN]:
        assert f"Stage '{stage}' is cached" in result.stdout, stage
    assert outs(project) == before


def test_forced_rerun_gives_byte_identical_outputs(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "state before the forced rerun", "--allow-empty"], project)
    before = outs(project)
    result = run(["dvc", "repro", "-f", "-s", "split"], project)
    result2 = run(["dvc", "repro", "-f", "-s", "balance"], project)
    assert ran(result.stdout) == ["split"] and ran(result2.stdout) == ["balance"]
    assert outs(project) == before
    assert run(["git", "status", "--porcelain"], project).stdout == ""  # metrics and plots unchanged too


def test_experiment_on_working_size_skips_download_and_split(project):
    result = run(["dvc", "exp", "run", "-S", "prepare.image_size=24"], project)
    assert ran(result.stdout) == ["prepare", "balance", TRAIN, *AFTER_TRAIN]
    summary = json.loads((project / "metrics/train/42/metrics.json").read_text())
    assert summary["image_size"] == 24  # the model was trained at the new size, not just the param changed
    import numpy as np

    assert np.load(project / "data/prepared/images.npy", mmap_mode="r").shape[1:] == (24, 24, 3)
    # `exp run` leaves its result in the workspace; put the committed state back.
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout", "--force"], project)


def test_split_param_reruns_split_and_what_follows(project):
    set_params(project, {"split.seed": 7})
    try:
        assert ran(run(["dvc", "repro"], project).stdout) == ["split", "balance", TRAIN, *AFTER_TRAIN]
    finally:
        run(["git", "checkout", "params.yaml"], project)
        run(["dvc", "repro"], project)


@pytest.mark.parametrize("param, value, stages", [
    ("explain.per_class", 2, ["explain"]), ("explain.method", "gradcam++", ["explain"]),
    ("evaluate.mel_specificity", 0.8, ["evaluate", "external"]),
    ("calibrate.tta", "flips", AFTER_TRAIN),
])
def test_scoring_params_rerun_only_their_stage_and_what_follows(project, param, value, stages):
    set_params(project, {param: value})
    try:
        assert ran(run(["dvc", "repro"], project).stdout) == stages
    finally:
        run(["git", "checkout", "params.yaml"], project)
        run(["dvc", "repro"], project)


def test_external_scoring_of_the_test_split_matches_the_evaluate_stage(project, synthetic_zips, tmp_path):
    import sys

    run([sys.executable, "-m", "skinlesion.score", "models/model.pt", str(synthetic_zips),
         "--labels", "data/split/test.csv", "-o", str(tmp_path / "external.json")], project)
    assert json.loads((tmp_path / "external.json").read_text()) == \
        json.loads((project / "metrics/evaluate.json").read_text())


def test_metrics_and_plots_diff_show_an_experiment_against_the_baseline(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline", "--allow-empty"], project)
    result = run(["dvc", "exp", "run", "-S", "train.lr=0.02", "-S", "train.epochs=2"], project)
    assert ran(result.stdout) == [TRAIN, *AFTER_TRAIN]
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    assert {"metrics/train/42/metrics.json", "metrics/evaluate.json", "metrics/calibrate.json"} <= set(diff)
    assert diff["metrics/train/42/metrics.json"]["epochs_run"] == {"old": 1, "new": 2, "diff": 1}
    plots = json.loads(run(["dvc", "plots", "diff", "--json"], project).stdout)["data"]
    revisions = set().union(*(entry["revisions"] for entries in plots.values() for entry in entries))
    assert {"workspace", "HEAD"} <= revisions
    assert any(name.endswith("val/balanced_accuracy.tsv") for name in plots) and any("ROC" in name for name in plots)
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout", "--force"], project)


def test_returning_to_the_defaults_restores_every_stage_from_the_run_cache(project):
    run(["dvc", "exp", "run", "-S", "train.epochs=2"], project)
    result = run(["dvc", "exp", "run", "-S", "train.epochs=1"], project)  # the committed value again
    try:
        assert ran(result.stdout) == [], result.stdout
        for stage in [TRAIN, *AFTER_TRAIN]:
            assert f"Stage '{stage}' is cached - skipping run" in result.stdout, stage
        assert json.loads((project / "metrics/train/42/metrics.json").read_text())["epochs_run"] == 1
    finally:
        run(["git", "checkout", "--", "."], project)
        run(["dvc", "checkout", "--force"], project)


def test_adding_a_member_trains_it_alone_and_removing_it_retrains_nothing(project):
    from skinlesion import modelfile

    before = outs(project)
    set_params(project, {"ensemble.seeds": [42, 7]})
    try:
        result = run(["dvc", "repro"], project)
        assert ran(result.stdout) == ["train@7", *AFTER_TRAIN]
        assert outs(project)["models/members/42.pt"] == before["models/members/42.pt"]
        _, info = modelfile.load(project / "models/model.pt")
        assert info.architecture == "ensemble" and len(info.members) == 2
        assert "2 member(s)" in result.stderr
        assert json.loads((project / "metrics/calibrate.json").read_text())["members"] == 2
    finally:
        run(["git", "checkout", "params.yaml"], project)
    result = run(["dvc", "repro"], project)
    assert not [stage for stage in ran(result.stdout) if stage.startswith("train")]
    assert outs(project)["models/model.pt"] == before["models/model.pt"]  # the one member, scored as before


def _touch(project, module: str) -> None:
    """A harmless edit, as a user's would be: a comment appended to the module."""
    path = project / module
    path.write_text(path.read_text() + "\n# edited\n")


@pytest.mark.parametrize("module, stages", [
    # plots.py draws for split, balance, evaluate, external and explain; their data outputs do not
    # change, so nothing downstream of them reruns
    ("skinlesion/plots.py", ["split", "balance", "evaluate", "external", "scope", "explain"]),
    ("skinlesion/evaluation/explain.py", ["explain"]),
    ("skinlesion/training/schedule.py", [TRAIN]),
])
def test_editing_code_reruns_exactly_the_stages_that_import_it(project, module, stages):
    _touch(project, module)
    try:
        assert ran(run(["dvc", "repro"], project).stdout) == stages
    finally:
        run(["git", "checkout", module], project)
        run(["dvc", "repro"], project)


def test_another_models_settings_rerun_nothing_the_chosen_ones_rerun_train(project):
    assert yaml.safe_load((project / "params.yaml").read_text())["model"] == "simple_cnn"
    set_params(project, {"models.fixcaps.channels": 8, "models.resnet18.head.hidden": 16})
    try:
        assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
        set_params(project, {"models.simple_cnn.head.hidden": 16})
        assert set(json.loads(run(["dvc", "status", "--json"], project).stdout)) == {TRAIN}
    finally:
        run(["git", "checkout", "params.yaml"], project)


def test_the_registered_model_comes_back_byte_for_byte_through_dvc_artifacts_get(project, tmp_path):
    """`artifacts:` in dvc.yaml names models/model.pt; a version is a git tag in the model
    registry's format, and another project fetches it by name from a clone's URL."""
    storage = tmp_path / "storage"
    run(["dvc", "remote", "add", "-d", "-f", "registry-test", str(storage)], project)
    try:
        run(["dvc", "push", "models/model.pt"], project)
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "model for the registry", "--allow-empty"], project)
        run(["git", "tag", "-a", "skin-lesion-classifier@v0.1.0", "-m", "Registering skin-lesion-classifier v0.1.0"],
            project)
        listed = run(["dvc", "artifacts", "get", "--help"], project).stdout
        assert "--rev" in listed
        got = tmp_path / "fetched.pt"
        run(["dvc", "artifacts", "get", project.resolve().as_uri(), "skin-lesion-classifier", "--rev", "v0.1.0",
             "-o", str(got)], tmp_path)
        assert got.read_bytes() == (project / "models/model.pt").read_bytes()
    finally:
        run(["dvc", "remote", "remove", "registry-test"], project, check=False)
        run(["git", "tag", "-d", "skin-lesion-classifier@v0.1.0"], project, check=False)


def test_evaluate_writes_intervals_and_a_model_card_generated_from_them(project):
    result = json.loads((project / "metrics/evaluate.json").read_text())
    assert list(result)[0] == "balanced_accuracy"  # the headline leads `dvc exp show`
    interval = result["ci95"]["balanced_accuracy"]
    assert interval["low"] <= result["balanced_accuracy"] <= interval["high"]
    assert result["ci95"]["resamples"] == yaml.safe_load((project / "params.yaml").read_text())["evaluate"][
        "bootstrap_resamples"]
    card = (project / "models/MODEL_CARD.md").read_text()
    assert f"{result['balanced_accuracy']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]" in card
    assert "not a diagnosis" in card and f"{result['images']} test images of {result['lesions']} lesions" in card
    from skinlesion import modelfile

    _, info = modelfile.load(project / "models/model.pt")
    assert {"tta", "tau", "temperature", "mel_threshold", "log_prior"} <= set(info.scoring.dump())
    assert "Also takes the patient's age, sex and body site" in card  # the default model does


def test_an_external_set_is_scored_like_the_test_split_and_reaches_the_model_card(project, synthetic_folder):
    assert json.loads((project / "metrics/external.json").read_text()) == {}  # none listed: nothing scored
    set_params(project, {"external.sources": [{"name": "synthetic-folder", "path": str(synthetic_folder)}]})
    try:
        assert ran(run(["dvc", "repro"], project).stdout) == ["external", "card"]
        scored = json.loads((project / "metrics/external.json").read_text())["synthetic-folder"]
        assert scored["images"] == len(list(synthetic_folder.glob("HAM10000_images_part_*/*.jpg")))
        assert list(scored)[0] == "balanced_accuracy" and "ci95" in scored
        assert (project / "plots/external/synthetic-folder/confusion_matrix.png").is_file()
        assert "| synthetic-folder |" in (project / "models/MODEL_CARD.md").read_text()
        set_params(project, {"external.sources": [{"name": "x", "path": str(project / "nowhere")}]})
        failed = run(["dvc", "repro"], project, check=False)
        assert failed.returncode != 0 and "external.sources item 1 (x)" in failed.stderr and "does not exist" in failed.stderr
    finally:
        run(["git", "checkout", "params.yaml"], project)
        run(["dvc", "repro"], project)


def test_the_isic2018_test_set_downloads_and_is_scored_as_an_external_set(project, synthetic_zips, http_server):
    from tests.test_download import serve_isic

    serve_isic(http_server, synthetic_zips, part="Test")
    set_params(project, {"external.sources": [{"name": "isic2018-test", "download": "isic2018_test"}],
                         "external.isic2018_url": f"{http_server.url}/2018"})
    try:
        assert ran(run(["dvc", "repro"], project).stdout) == ["external", "card"]
        scored = json.loads((project / "metrics/external.json").read_text())["isic2018-test"]
        listed = pd.read_csv(synthetic_zips / "HAM10000_metadata.csv")
        assert scored["images"] == len(listed) and scored["lesions"] == len(listed)  # no groupings: image = lesion
        assert (project / "plots/external/isic2018-test/confusion_matrix.png").is_file()
        assert (project / "data/downloads/isic2018_test/ISIC2018_Task3_Test_Input.zip").is_file()
        set_params(project, {"external.sources": [{"name": "both", "path": "x", "download": "isic2018_test"}]})
        failed = run(["dvc", "repro"], project, check=False)
        assert failed.returncode != 0 and "Traceback" not in failed.stderr
        assert "external source 'both' needs either a path" in failed.stderr
    finally:
        run(["git", "checkout", "params.yaml"], project)
        run(["dvc", "repro"], project)


def test_the_patients_metadata_runs_through_every_stage_and_can_be_left_out(project, synthetic_zips, tmp_path):
    from skinlesion import modelfile
    from skinlesion.deployment import runtime

    # on by default: the baseline model takes age, sex and site
    _, info = modelfile.load(project / "models/model.pt")
    assert info.patient.sex == ["male", "female"] and info.scoring is not None
    assert runtime.load(project / "models/model.onnx")[1].patient == info.patient
    split = pd.read_csv(project / "data/split/test.csv")
    assert {"age", "sex", "localization"} <= set(split.columns)
    # --score reads the source's own metadata CSV: the same numbers as the evaluate stage
    run([sys.executable, "-m", "skinlesion.score", "models/model.pt", str(synthetic_zips),
         "--labels", "data/split/test.csv", "-o", str(tmp_path / "scored.json")], project)
    scored = json.loads((tmp_path / "scored.json").read_text())
    assert scored["balanced_accuracy"] == json.loads((project / "metrics/evaluate.json").read_text())[
        "balanced_accuracy"]
    result = run(["dvc", "exp", "run", "-S", "train.metadata=false"], project)
    try:
        assert ran(result.stdout) == [TRAIN, *AFTER_TRAIN]
        _, info = modelfile.load(project / "models/model.pt")
        assert info.patient is None and runtime.load(project / "models/model.onnx")[1].patient is None
        assert json.loads((project / "metrics/evaluate.json").read_text())["images"] > 0
        assert json.loads((project / "metrics/explain.json").read_text())["images"] > 0
    finally:
        run(["git", "checkout", "--", "."], project)
        run(["dvc", "checkout", "--force"], project)
