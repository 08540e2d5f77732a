"""Bayesian search of the recipe with Optuna, each trial a DVC experiment.

    python -m skinlesion.tune --trials 20                 # the search space of tune.yaml
    python -m skinlesion.tune --trials 20 -S prepare.image_size=64 -S train.epochs=18   # fixed: not searched
    dvc exp show                                          # every trial, with its params and validation figures
    dvc exp apply tune-7                                  # bring trial 7 into the workspace

A trial is ``dvc exp run -n STUDY-NUMBER -S key=value ... train``: the data stages (from
the run cache when unchanged) and the members' train stages, nothing after them, so
the test split is never read by a trial. The objective is the validation figure of the
epoch each member kept (``objective`` in the space file, e.g. ``val_macro_auc``),
averaged over the members; TPE samples the next trial, and a median pruner, fed that
figure after every epoch (DVCLive's curve), stops a trial that falls behind.

The study lives in SQLite under the repository by default (``.optuna/studies.db``,
git-ignored); any database URL Optuna accepts (``--storage postgresql://...``) lets
several machines work on one study. Ctrl-C stops the trial under way (marked failed)
and leaves the study resumable: the next call with the same study carries on until
``--trials`` trials have completed or been pruned. At the end it prints the best trial as
a ``dvc exp run -S ...`` line and writes Optuna's history and parameter-importance plots,
with a table of the trials, under ``plots/tune/``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from skinlesion import PipelineError, cli, params, plots
from skinlesion.files import write_csv
from skinlesion.untrusted import shown

log = logging.getLogger("skinlesion.tune")

SPACE = Path("tune.yaml")
STORAGE = "sqlite:///.optuna/studies.db"
POLL_SECONDS = 2.0
PLOTS = Path("plots/tune")
STARTUP_TRIALS = 10  # Optuna's default: random trials before TPE models the space
# Epochs before the pruner may stop a trial. A weight EMA lags its model early on: at the
# default decay of 0.995 and about 90 batches an epoch, two epochs leave 40 % of the
# initial random weights in the averaged model (0.998: 69 %), so an early curve ranks the
# EMA decays, not the recipes (a study pruned from epoch 2 on stopped both of its 0.998 trials there).
PRUNE_WARMUP = 8


class TrialFailed(Exception):
    """The experiment of a trial did not finish (diverged, bad params): the study goes on."""


def read_space(path: Path) -> dict:
    """The search space: ``objective`` and, per dotted param, ``{low, high[, log][, int]}``
    or ``{choices: [...]}``; each param must be one this pipeline knows."""
    values = params.read_mapping(path, f"{path}: no such search-space file; give one with --space (see tune.yaml)",
                                 "with objective and params")
    objective = values.get("objective")
    space = values.get("params")
    if not isinstance(objective, str) or not objective.startswith("val_"):
        raise PipelineError(f"{path}: objective must name a validation figure of the kept epoch (val_macro_auc, "
                            f"val_balanced_accuracy, val_loss, ...), not {objective!r}: the test split is never "
                            f"a search objective")
    if not isinstance(space, dict) or not space:
        raise PipelineError(f"{path}: params must map dotted params to their ranges, e.g. "
                            f"train.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}")
    for key, spec in space.items():
        params.schema_at(key)  # a param the pipeline knows, else one line naming it
        if key.split(".")[0] not in ("model", "models", "train", "prepare", "balance", "ensemble"):
            raise PipelineError(f"{path}: {key} is not a training param; a trial runs only up to the train stages")
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise PipelineError(f"{path}: {key} needs {{low, high}} (with log: true or int: true) or {{choices: [...]}}")
    return {"objective": objective, "direction": "minimize" if objective == "val_loss" else "maximize",
            "params": space}


def without_fixed(space: dict, fixed: list[str]) -> dict:
    """The space less the params fixed with ``-S key=value``: a fixed param is not searched."""
    keys = set()
    for item in fixed:
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            raise PipelineError(f"-S {item}: give a fixed param as key=value, e.g. -S prepare.image_size=64")
        keys.add(key.strip())
    searched = {key: spec for key, spec in space["params"].items() if key not in keys}
    if not searched:
        raise PipelineError(f"every param of the search space is fixed with -S ({', '.join(sorted(keys))}): "
                            f"leave at least one to search")
    for key in sorted(keys & set(space["params"])):
        log.info("%s is fixed with -S: not searched", key)
    return {**space, "params": searched}


def override(key: str, value) -> str:
    """``key=value`` as ``dvc exp run -S`` reads it back (YAML): a string bare where YAML
    keeps it a string, everything else as JSON."""
    text = value if isinstance(value, str) and yaml.safe_load(value) == value else json.dumps(value)
    return f"{key}={text}"


def overrides(fixed: list[str], chosen: dict) -> list[str]:
    """A trial's ``-S`` values: the fixed params first, then the chosen ones."""
    return [*fixed, *(override(key, value) for key, value in chosen.items())]


def best_command(fixed: list[str], chosen: dict) -> str:
    """The best trial as the `dvc exp run` line that trains it again."""
    return " ".join(["dvc exp run", *(f"-S {shlex.quote(item)}" for item in overrides(fixed, chosen))])


def write_plots(study, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances (PNG) and the trials (CSV),
    named after the study; the importances need two completed trials that differ."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    name = study.study_name
    written = [folder / f"{name}-trials.csv"]
    columns = ["number", "state", "value", "duration"] + [f"params_{key}" for key in sorted(
        {key for trial in study.trials for key in trial.params})]
    table = study.trials_dataframe()
    table["duration"] = table["duration"].dt.total_seconds().round(1) if "duration" in table else None
    write_csv(written[0], table.reindex(columns=columns))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axis = optuna_plots.plot_optimization_history(study)
        axis.figure.set_size_inches(9, 4.5)
        axis.figure.tight_layout()  # the legend, outside the axes, in the picture
        plots.save_figure(axis.figure, folder / f"{name}-history.png")
        written.append(folder / f"{name}-history.png")
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) < 2 or len({tuple(sorted(t.params.items())) for t in complete}) < 2:
            log.info("parameter importances: not drawn (they need two completed trials that differ)")
            return written
        try:
            axis = optuna_plots.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError) as error:
            log.info("parameter importances: not drawn (%s)", shown(str(error), 160))
            return written
        axis.figure.set_size_inches(8, 4.5)
        axis.figure.tight_layout()  # the params' names in full
        plots.save_figure(axis.figure, folder / f"{name}-importance.png")
        written.append(folder / f"{name}-importance.png")
    return written


def suggest(trial, space: dict) -> dict:
    chosen = {}
    for key, spec in space.items():
        if "choices" in spec:
            chosen[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif spec.get("int"):
            chosen[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            chosen[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return chosen


def sampler(seed: int, startup_trials: int):
    """TPE, after ``startup_trials`` random trials (counted over the whole study)."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)


def member_seeds(root: Path, chosen: dict) -> list[int]:
    return list(chosen.get("ensemble.seeds") or params.read_group("ensemble", root).seeds)


def epoch_figures(root: Path, seed: int, objective: str) -> pd.Series:
    """The validation figure after each epoch so far (DVCLive's curve of member ``seed``)."""
    path = root / "metrics" / "train" / str(seed) / "plots" / "metrics" / "val" / f"{objective.removeprefix('val_')}.tsv"
    try:
        table = pd.read_csv(path, sep="\t")
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.Series(dtype=float)
    return table.set_index("step")[table.columns[-1]]


def training_started(log_text: str, seed: int) -> bool:
    """Whether ``dvc exp run`` has started member ``seed``'s train stage. Until then the
    workspace's curve is not this trial's: ``dvc exp run`` first checks out the
    baseline's outputs, curve included, and DVC removes a stage's outputs only just
    before it says "Running stage"."""
    return f"Running stage 'train@{seed}':" in log_text


def kept_figure(root: Path, seeds: list[int], objective: str) -> float:
    """The objective: the validation figure of the epoch each member kept, averaged."""
    values = []
    for seed in seeds:
        path = root / "metrics" / "train" / str(seed) / "metrics.json"
        try:
            values.append(float(json.loads(path.read_text())[objective]))
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise TrialFailed(f"{path} has no {objective} ({type(error).__name__})") from None
    return sum(values) / len(values)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_trial(trial, root: Path, space: dict, fixed: list[str], study_name: str) -> float:
    import optuna

    chosen = suggest(trial, space["params"])
    name = f"{study_name}-{trial.number}"
    command = ["dvc", "exp", "run", "-n", name, *[part for item in overrides(fixed, chosen) for part in ("-S", item)],
               "train"]
    trial.set_user_attr("experiment", name)
    log.info("trial %d (%s): %s", trial.number, name, ", ".join(f"{k}={v}" for k, v in chosen.items()))
    seeds = member_seeds(root, chosen)
    logs = root / ".optuna" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "w", encoding="utf-8") as output:
        # Its own session, so a Ctrl-C reaches the study first; SIGINT's default disposition, so
        # that stopping it works under `nohup ... &` too (a shell starts those with SIGINT ignored).
        process = subprocess.Popen(command, cwd=root, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=default_sigint)
        reported = set()

        def new_epochs():
            for step, value in epoch_figures(root, seeds[0], space["objective"]).items():
                if step not in reported:
                    reported.add(step)
                    trial.report(float(value), int(step))
                    yield step, value

        training = False
        try:
            while process.poll() is None:
                time.sleep(POLL_SECONDS)
                training = training or training_started(
                    (logs / f"{name}.log").read_text(encoding="utf-8", errors="replace"), seeds[0])
                for step, value in new_epochs() if training else ():
                    if trial.should_prune():
                        os.killpg(process.pid, signal.SIGINT)
                        process.wait()
                        log.info("trial %d pruned after epoch %d (%s %.4f)", trial.number, step,
                                 space["objective"], value)
                        raise optuna.TrialPruned()
        except BaseException:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                process.wait()
            raise
        if process.returncode == 0:  # the workspace holds this trial's curve now (run or restored from the run cache)
            for _ in new_epochs():  # the epochs that ended after the last look: the whole curve in the study
                pass
    text = (logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")
    ran = [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")]
    trial.set_user_attr("stages", ran)
    if process.returncode != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        failure = TrialFailed(f"{name}: `dvc exp run` exited {process.returncode}: {last[0][:300]} "
                              f"(the whole log: .optuna/logs/{name}.log)")
        log.warning("warning: trial %d failed: %s", trial.number, failure)
        raise failure
    value = kept_figure(root, seeds, space["objective"])
    log.info("trial %d: %s %.4f", trial.number, space["objective"], value)
    return value


def tune(root: Path, *, trials: int, space_path: Path, storage: str, study_name: str, fixed: list[str],
         seed: int = 0, startup_trials: int = STARTUP_TRIALS, prune_warmup: int = PRUNE_WARMUP) -> dict:
    """Run the study until ``trials`` trials have completed or been pruned; returns the best."""
    import optuna

    space = without_fixed(read_space(space_path), fixed)
    params.check_all(params.read_yaml(root / "params.yaml"))  # a broken params.yaml fails now, not in every trial
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        (root / storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its tracebacks of failed trials: ours are one line
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                direction=space["direction"], sampler=sampler(seed, startup_trials),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=prune_warmup))
    # A continued study must not draw the points it drew before (the sampler's first draws
    # are random from its seed): the seed moves on with the trials already in the study.
    study.sampler = sampler(seed + len(study.trials), startup_trials)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    if done:
        log.info("study %s: %d trial(s) already done, carrying on", study_name, len(done))
    params_file = root / "params.yaml"
    original = params_file.read_bytes()
    try:
        for _ in range(max(trials - len(done), 0)):
            study.optimize(lambda trial: run_trial(trial, root, space, fixed, study_name), n_trials=1,
                           catch=(TrialFailed,))
    finally:
        params_file.write_bytes(original)  # the workspace's params as they were; the trials live in `dvc exp show`
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise PipelineError(f"study {study_name}: no trial completed; see the failures above")
    best = study.best_trial
    written = write_plots(study, root / PLOTS)
    return {"study": study_name, "trials": len(study.trials), "best": best.number, "experiment":
            best.user_attrs.get("experiment"), "objective": space["objective"], "value": best.value,
            "params": best.params, "command": best_command(fixed, best.params), "plots": written}


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m skinlesion.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials to complete or prune in all (default 20)")
    parser.add_argument("--space", type=Path, default=SPACE, help="the search space (default tune.yaml)")
    parser.add_argument("--storage", default=STORAGE, help=f"an Optuna database URL (default {STORAGE})")
    parser.add_argument("--study", default="tune", help="the study's name, and its experiments' prefix")
    parser.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    parser.add_argument("--startup-trials", type=int, default=STARTUP_TRIALS,
                        help=f"random trials before TPE models the space (default {STARTUP_TRIALS}, Optuna's; "
                             f"lower it for a short study)")
    parser.add_argument("-S", "--set-param", dest="fixed", action="append", default=[],
                        help="a param fixed for every trial, as `dvc exp run -S` takes it")
    parser.add_argument("--prune-warmup", type=int, default=PRUNE_WARMUP,
                        help=f"epochs before the pruner may stop a trial (default {PRUNE_WARMUP}: a weight EMA "
                             f"lags early)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if args.startup_trials < 1:
        parser.error("--startup-trials must be at least 1")
    if args.prune_warmup < 0:
        parser.error("--prune-warmup must be 0 or more")

    def work() -> int:
        best = tune(Path("."), trials=args.trials, space_path=args.space, storage=args.storage,
                    study_name=args.study, fixed=args.fixed, seed=args.seed,
                    startup_trials=args.startup_trials, prune_warmup=args.prune_warmup)
        log.info("best: trial %d (%s), %s %.4f; `dvc exp apply %s` brings it into the workspace, or "
                 "train it again with:", best["best"], best["experiment"], best["objective"], best["value"],
                 best["experiment"])
        print(best["command"])
        log.info("plots: %s", ", ".join(str(path) for path in best["plots"]))
        return 0

    return cli.guarded("tune: ", work)


if __name__ == "__main__":
    sys.exit(main())
