"""DVC stage `download`: bring HAM10000 into data/raw/ (skinlesion.data.download)."""

from pathlib import Path

from skinlesion.cli import run_stage
from skinlesion.data import download


def main(params):
    settings = params.download
    download.download(settings, out=Path("data/raw"), cache=Path(settings.cache_dir))


if __name__ == "__main__":
    run_stage("download", main)
