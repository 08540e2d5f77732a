"""DVC stage `card`: write models/MODEL_CARD.md from the metrics the pipeline wrote,
so it cannot disagree with them (skinlesion.evaluation.card)."""

import json
from pathlib import Path

import pandas as pd

from skinlesion import modelfile
from skinlesion.cli import run_stage
from skinlesion.evaluation import card


def _read(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def main(params):
    _, info = modelfile.load(Path("models/model.pt"))
    groups = Path("plots/evaluate/subgroups.csv")
    card.write(Path("models/MODEL_CARD.md"), info, _read("plots/split/summary.json"), _read("metrics/evaluate.json"),
               _read("metrics/external.json"), pd.read_csv(groups) if groups.exists() else None)


if __name__ == "__main__":
    run_stage("card", main)
