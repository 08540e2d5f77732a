"""`dvc exp run -S model=NAME` for every architecture, on synthetic data in a real
git+DVC repository: only `train` and its dependants rerun, evaluate and explain
work for every model, and `dvc metrics diff` shows the change."""

from __future__ import annotations

import json
import re
import sys

import pytest

from skinlesion import params
from skinlesion.training import models
from tests.conftest import make_project, run

pytestmark = pytest.mark.slow  # real git+DVC projects and processes


@pytest.fixture(scope="module")
def project(synthetic_zips, tmp_path_factory):
    # 64 px so FixCaps' layers fit; a small FixCaps and one short epoch keep it quick.
    root = make_project(tmp_path_factory.mktemp("experiments") / "project", synthetic_zips,
                        {"prepare.image_size": 64, "models.fixcaps.channels": 16,
                         "models.fixcaps.primary_types": 4})
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline: simple_cnn"], root)
    return root


@pytest.mark.parametrize("name", [n for n in params.ARCHITECTURES if n != "simple_cnn"])
def test_exp_run_each_model_reruns_only_train_and_what_follows(project, name):
    result = run(["dvc", "exp", "run", "-n", f"try-{name}", "-S", f"model={name}"], project)
    stages = re.findall(r"Running stage '([\w@]+)'", result.stdout)
    assert stages == ["train@42", "calibrate", "export", "evaluate", "external", "scope", "card", "explain"]

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    changed = diff["metrics/train/42/metrics.json"]
    assert changed["parameters"]["new"] == models.parameter_count(
        models.build(name, num_classes=7, image_size=64, settings=_settings(project, name),
                     head={"hidden": 256, "dropout": 0.3}, patient_width=_patient_width(project)))
    assert changed["parameters"]["old"] != changed["parameters"]["new"]

    assert "metrics/evaluate.json" in diff and "metrics/explain.json" in diff
    assert f'"try-{name}"' in run(["dvc", "exp", "show", "--json"], project).stdout  # listed by its name
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout", "--force"], project)


def _patient_width(project):
    import yaml

    from skinlesion.data import patient

    uses = yaml.safe_load((project / "params.yaml").read_text())["train"]["metadata"]
    return patient.width(patient.encoding()) if uses else 0


def _settings(project, name):
    import yaml

    settings = dict(yaml.safe_load((project / "params.yaml").read_text())["models"][name] or {})
    settings.pop("head", None)
    return settings


def test_an_architecture_added_in_one_registry_entry_trains_through_exp_run(project):
    """One line in the registry (here reusing simple_cnn's builder at a toy size) and its
    settings in params.yaml: `model=toy` then validates, trains, and is served by every
    later stage, with no other file touched."""
    import yaml

    registry = project / "skinlesion/params.py"
    source = registry.read_text()
    anchor = '    "fixcaps": Architecture('
    assert source.count(anchor) == 1
    registry.write_text(source.replace(anchor, '    "toy": Architecture(SimpleCnn, "simple_cnn", pretrained=False),\n'
                                               + anchor))
    shipped = yaml.safe_load((project / "params.yaml").read_text())
    shipped["models"]["toy"] = {"channels": [4], "dropout": 0.0, "head": {"hidden": 0, "dropout": 0.0}}
    (project / "params.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    try:
        result = run(["dvc", "exp", "run", "-n", "try-toy", "-S", "model=toy"], project)
        assert "Running stage 'train@42'" in result.stdout and "Running stage 'explain'" in result.stdout
        trained = json.loads((project / "metrics/train/42/metrics.json").read_text())
        assert trained["parameters"] == models.parameter_count(models.build(
            "simple_cnn", num_classes=7, image_size=64, settings={"channels": [4], "dropout": 0.0},
            head={"hidden": 0, "dropout": 0.0}, patient_width=_patient_width(project)))
        described = run([sys.executable, "-c", "from skinlesion import modelfile; "
                         "print(modelfile.load('models/model.pt')[1].architecture)"], project)
        assert described.stdout.strip() == "toy"
        assert '"try-toy"' in run(["dvc", "exp", "show", "--json"], project).stdout
    finally:
        run(["git", "checkout", "--", "."], project)
        run(["dvc", "checkout", "--force"], project)
