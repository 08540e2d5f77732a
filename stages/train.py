"""DVC stage `train`: fit the chosen model, select on validation (skinlesion.training)."""

from pathlib import Path

from skinlesion import training
from skinlesion.cli import run_stage


def main(params):
    data = training.load_data(Path("data/balanced"), Path("data/split"), Path("data/prepared"))
    config = {"model": params["model"], "models": params["models"], "train": params["train"]}
    training.fit(config, data, model_path=Path("models/model.pt"), live_dir=Path("metrics/train"),
                 checkpoint_dir=Path("models/checkpoints"))


if __name__ == "__main__":
    run_stage("train", main)
