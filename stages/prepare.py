"""DVC stage `prepare`: decode and resize every image once (skinlesion.data.prepare)."""

from pathlib import Path

from skinlesion.cli import run_stage
from skinlesion.data import prepare


def main(params):
    prepare.prepare(Path("data/raw"), Path("data/prepared"), params.prepare.image_size)


if __name__ == "__main__":
    run_stage("prepare", main)
