"""`dvc exp run -S model=NAME` for every architecture, on synthetic data in a real
git+DVC repository: only `train` and its dependants rerun, evaluate and explain
work for every model, and `dvc metrics diff` shows the change."""

from __future__ import annotations

import json
import re

import pytest

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


@pytest.mark.parametrize("name", [n for n in models.ARCHITECTURES if n != "simple_cnn"])
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
