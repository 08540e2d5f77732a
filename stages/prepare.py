"""DVC stage `prepare`: decode and resize every image once (skinlesion.prepare)."""

from pathlib import Path

from skinlesion.data import prepare
from skinlesion.cli import run_stage


def main(params):
    prepare.prepare(Path("data/raw"), Path("data/prepared"), params["prepare"]["image_size"])


if __name__ == "__main__":
    run_stage("prepare", main)
