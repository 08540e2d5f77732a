"""DVC stage `train`: fit the chosen model, select on validation (skinlesion.training).

With train.nproc > 1 the stage starts itself again under torchrun, one process per
GPU (or CPU share), and the processes train one model with DistributedDataParallel.
"""

import os
import subprocess
import sys
from pathlib import Path

from skinlesion.cli import run_stage
from skinlesion.training import train


def main(params):
    nproc = params["train"]["nproc"]
    if isinstance(nproc, int) and nproc > 1 and "LOCAL_RANK" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "stages.train"]
        sys.exit(subprocess.call(command))
    data = train.load_data(Path("data/balanced"), Path("data/split"), Path("data/prepared"),
                           metadata=params["train"]["metadata"])
    config = {"model": params["model"], "models": params["models"], "train": params["train"]}
    train.fit(config, data, model_path=Path("models/trained.pt"), live_dir=Path("metrics/train"),
                 checkpoint_dir=Path("models/checkpoints"))


if __name__ == "__main__":
    run_stage("train", main)
