"""The Optuna search: each trial a real DVC experiment on synthetic data, listed by
`dvc exp show` and applied by `dvc exp apply`; the test split never reached; Ctrl-C
leaves the study resumable; the pruner stops a trial worse than the median; a bad search
space is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml

from skinlesion import PipelineError, tune
from tests.conftest import PROJECT, make_project, run

SPACE = {"objective": "val_macro_auc",
         "params": {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "train.epochs": {"low": 1, "high": 2,
                                                                                              "int": True}}}


def storage(project) -> str:
    return f"sqlite:///{project}/.optuna/studies.db"


def study(project, name: str = "tune"):
    return optuna.load_study(study_name=name, storage=storage(project))


def tune_command(trials: int, *options: str, space: str = "space.yaml") -> list[str]:
    return [sys.executable, "-m", "skinlesion.tune", "--trials", str(trials), "--space", space, *options]


@pytest.mark.slow
def test_trials_are_experiments_the_test_split_is_never_reached_and_ctrl_c_resumes(synthetic_zips, tmp_path):
    project = make_project(tmp_path / "project", synthetic_zips)
    run(["dvc", "repro"], project)  # the baseline a user tunes from
    (project / "space.yaml").write_text(yaml.safe_dump(SPACE))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    first = run(tune_command(2), project)
    assert "best: trial" in first.stderr
    trials = study(project).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    # each trial's curve is its own (the workspace held the baseline's curve when the first began)
    for trial in trials:
        assert sorted(trial.intermediate_values) == list(range(1, trial.params["train.epochs"] + 1))
    best = max(trials, key=lambda t: t.value)
    assert first.stdout.strip() == tune.best_command([], best.params)
    for name in ("tune-trials.csv", "tune-history.png", "tune-importance.png"):
        assert (project / "plots/tune" / name).stat().st_size > 0, name

    # every trial is an experiment with its params and its validation figure
    shown = run(["dvc", "exp", "show", "--json"], project).stdout
    for trial in trials:
        assert trial.user_attrs["experiment"] in shown
    experiments = {}
    for entry in json.loads(shown):
        for child in entry.get("experiments") or []:
            for revision in child.get("revs", []):
                if revision.get("name"):
                    experiments[revision["name"]] = revision["data"]
    for trial in trials:
        data = experiments[trial.user_attrs["experiment"]]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == pytest.approx(trial.params["train.lr"])
        summary = data["metrics"]["metrics/train/42/metrics.json"]["data"]
        assert summary["val_macro_auc"] == pytest.approx(trial.value)
        assert trial.intermediate_values[summary["best_epoch"]] == pytest.approx(trial.value)  # its own curve

    # no trial ran a stage that reads the test split
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    reads_test = {name for name, spec in stages.items() if "data/split/test.csv" in spec.get("deps", [])}
    assert {"evaluate", "explain", "scope"} <= reads_test
    for trial in trials:
        ran = {stage.split("@")[0] for stage in trial.user_attrs["stages"]}
        assert "train" in ran and not ran & reads_test, ran

    # the workspace's params are as they were; `dvc exp apply` brings a trial in
    assert (project / "params.yaml").read_text() == run(["git", "show", "HEAD:params.yaml"], project).stdout
    run(["dvc", "exp", "apply", trials[1].user_attrs["experiment"]], project)
    applied = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert applied["lr"] == pytest.approx(trials[1].params["train.lr"])
    assert applied["epochs"] == trials[1].params["train.epochs"]
    run(["git", "checkout", "--", "."], project)

    # Ctrl-C in the middle of the third trial: exit 130, the trial failed, the study resumable
    # The default SIGINT disposition, as in a terminal, even where pytest runs as a background job
    process = subprocess.Popen(tune_command(3), cwd=project, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "SKINLESION_PROGRESS": "0"},
                               preexec_fn=tune.default_sigint)
    deadline = time.monotonic() + 300
    while not (project / ".optuna/logs/tune-2.log").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert study(project).trials[2].state == optuna.trial.TrialState.FAIL
    resumed = run(tune_command(3), project)
    assert "2 trial(s) already done, carrying on" in resumed.stderr
    states = [t.state for t in study(project).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and len(states) == 4
    # a continued study draws new points, not those of its first run again
    drawn = [tuple(sorted(t.params.items())) for t in study(project).trials]
    assert len(set(drawn)) == len(drawn), drawn

    # Pruning: next to three finished trials whose validation loss was 0 after every epoch, a
    # real trial (a cross-entropy is never 0) is worse than the median at its first epoch, so
    # the pruner stops its `dvc exp run` there and the trial counts as pruned, not failed.
    finished = optuna.create_study(study_name="prune", direction="minimize", storage=storage(project))
    lr = optuna.distributions.FloatDistribution(1.0e-3, 1.0e-2, log=True)
    for value in (0.003, 0.004, 0.005):
        finished.add_trial(optuna.trial.create_trial(params={"train.lr": value}, distributions={"train.lr": lr},
                                                     value=0.0, intermediate_values=dict.fromkeys(range(1, 7), 0.0)))
    (project / "loss.yaml").write_text(yaml.safe_dump({**SPACE, "objective": "val_loss"}))
    pruning = run(tune_command(4, "--study", "prune", "--prune-warmup", "0", "-S", "train.epochs=6",
                               space="loss.yaml"), project)
    trial = study(project, "prune").trials[3]
    assert trial.state == optuna.trial.TrialState.PRUNED, pruning.stderr
    assert trial.intermediate_values and min(trial.intermediate_values.values()) > 0, trial.intermediate_values
    assert "trial 3 pruned after epoch" in pruning.stderr
    assert (project / "params.yaml").read_text() == run(["git", "show", "HEAD:params.yaml"], project).stdout


@pytest.mark.parametrize("space, message", [
    ({"objective": "test_macro_auc", "params": SPACE["params"]}, "objective must name a validation figure"),
    ({"objective": "val_macro_auc", "params": {"train.lrr": {"low": 1, "high": 2}}}, "train.lrr"),
    ({"objective": "val_macro_auc", "params": {"evaluate.batch_size": {"low": 1, "high": 2}}},
     "not a training param"),
    ({"objective": "val_macro_auc", "params": {"train.lr": {"low": 1}}}, "train.lr needs {low, high}"),
    ({"objective": "val_macro_auc"}, "params must map dotted params"),
])
def test_a_bad_search_space_is_one_line(tmp_path, space, message):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(PipelineError, match=message):
        tune.read_space(tmp_path / "space.yaml")


def test_the_shipped_space_is_valid_and_searches_what_the_issue_names():
    space = tune.read_space(PROJECT / "tune.yaml")
    assert space["direction"] == "maximize"
    assert {"train.lr", "train.weight_decay", "train.epochs", "train.ema", "train.sampler", "train.mixup",
            "train.cutmix", "prepare.image_size"} <= set(space["params"])


def toy_study(values: list[float | None]):
    """An in-memory study whose trials report ``values`` (None: pruned after one epoch)."""
    created = optuna.create_study(study_name="toy", direction="maximize",
                                  sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        lr = trial.suggest_float("train.lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("train.sampler", ["shuffle", "balanced"])
        value = values[trial.number]
        if value is None:
            trial.report(0.5, 1)
            raise optuna.TrialPruned()
        return value + 0 * lr

    created.optimize(objective, n_trials=len(values))
    return created


def test_the_plots_and_the_trials_table_are_written_for_a_study(tmp_path):
    written = tune.write_plots(toy_study([0.90, None, 0.93, 0.91]), tmp_path / "plots")
    assert [path.name for path in written] == ["toy-trials.csv", "toy-history.png", "toy-importance.png"]
    table = pd.read_csv(tmp_path / "plots/toy-trials.csv")
    assert list(table["state"]) == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"]
    assert table["value"].iloc[2] == pytest.approx(0.93)
    assert {"params_train.lr", "params_train.sampler"} <= set(table.columns)
    for path in written[1:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one completed trial: the history, no importances (they need two that differ)
    assert [p.name for p in tune.write_plots(toy_study([0.9]), tmp_path / "one")] == ["toy-trials.csv",
                                                                                      "toy-history.png"]


def test_fixed_params_leave_the_space_and_the_best_is_a_command_line():
    space = {"objective": "val_macro_auc", "direction": "maximize",
             "params": {"train.lr": {"low": 1e-3, "high": 1e-2}, "prepare.image_size": {"choices": [64, 128]}}}
    assert set(tune.without_fixed(space, ["prepare.image_size=64"])["params"]) == {"train.lr"}
    with pytest.raises(PipelineError, match="every param of the search space is fixed"):
        tune.without_fixed(space, ["prepare.image_size=64", "train.lr=0.001"])
    with pytest.raises(PipelineError, match="-S train.lr: give a fixed param as key=value"):
        tune.without_fixed(space, ["train.lr"])
    line = tune.best_command(["prepare.image_size=64"], {"train.lr": 0.003, "train.sampler": "balanced",
                                                         "ensemble.seeds": [1, 2], "x.y": "yes"})
    assert line == ("dvc exp run -S prepare.image_size=64 -S train.lr=0.003 -S train.sampler=balanced "
                    "-S 'ensemble.seeds=[1, 2]' -S 'x.y=\"yes\"'")


def test_tpe_models_the_space_after_the_startup_trials():
    def draws(sampler, n):
        created = optuna.create_study(direction="maximize", sampler=sampler)
        created.optimize(lambda trial: -(trial.suggest_float("x", -1, 1) - 0.3) ** 2, n_trials=n)
        return [trial.params["x"] for trial in created.trials]

    random_draws = draws(optuna.samplers.RandomSampler(seed=5), 4)
    tpe_draws = draws(tune.sampler(5, startup_trials=3), 4)
    assert tpe_draws[:3] == pytest.approx(random_draws[:3])  # the startup trials: random draws of the seed
    assert tpe_draws[3] != pytest.approx(random_draws[3])  # then TPE proposes



def test_a_trial_reads_no_curve_before_its_own_train_stage_runs():
    log = "Running stage 'download':\nStage 'split' didn't change, skipping\n"
    assert not tune.training_started(log, 42)
    assert not tune.training_started(log + "Running stage 'train@420':\n", 42)
    assert tune.training_started(log + "Running stage 'train@42':\n> python -m stages.train 42\n", 42)


@pytest.mark.parametrize("option, message", [("--prune-warmup=-1", "--prune-warmup must be 0 or more"),
                                             ("--startup-trials=0", "--startup-trials must be at least 1")])
def test_a_bad_study_option_is_one_line(option, message):
    done = subprocess.run([sys.executable, "-m", "skinlesion.tune", option], cwd=PROJECT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
