"""DVC stage `train@SEED`: fit one member of the ensemble, the chosen model with seed
SEED (one of ``ensemble.seeds``), selecting on validation (skinlesion.training.train).

Writes ``models/members/SEED.pt`` and DVCLive's ``metrics/train/SEED/``; the per-epoch
checkpoint and DVCLive's own folder live in ``models/checkpoints/SEED/`` (not a DVC
output), so a killed run resumes where it stopped.

With train.nproc > 1 the stage starts itself again under torchrun, one process per
GPU (or CPU share), and the processes train one model with DistributedDataParallel.
"""

import os
import subprocess
import sys
from pathlib import Path

from skinlesion import PipelineError
from skinlesion.cli import run_stage
from skinlesion.training import train


def member_seed(arguments: list[str]) -> int:
    if len(arguments) != 1 or not arguments[0].isdigit():
        raise PipelineError("usage: python -m stages.train SEED (dvc.yaml's train@SEED passes one of "
                            "ensemble.seeds); run it as `dvc repro train`")
    return int(arguments[0])


def main(params):
    seed = member_seed(sys.argv[1:])
    nproc = params.train.nproc
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "stages.train", str(seed)]
        sys.exit(subprocess.call(command))
    data = train.load_data(Path("data/balanced"), Path("data/split"), Path("data/prepared"),
                           metadata=params.train.metadata)
    config = train.Config(params.model, params.architecture, params.train, seed)
    train.fit(config, data, model_path=Path(f"models/members/{seed}.pt"), live_dir=Path(f"metrics/train/{seed}"),
              checkpoint_dir=Path(f"models/checkpoints/{seed}"))


if __name__ == "__main__":
    run_stage("train", main)
