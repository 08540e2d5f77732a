"""Score a saved model on a labelled source: the evaluate stage's figures, with intervals.

    python -m skinlesion.score MODEL SOURCE [--labels CSV] -o metrics.json

MODEL is a model file (models/model.pt) or its ONNX export (models/model.onnx). SOURCE
is a folder or zip in HAM10000 layout (images and a metadata CSV with dx and
lesion_id); ``--labels`` narrows it to the image_ids of a CSV (``data/split/test.csv``
gives the test split, scored as the evaluate stage scores it). The images are decoded
and scored exactly as ``python -m skinlesion.predict`` does; the intervals resample
lesions. Exit code: 0 when every image was scored, 1 if any failed, 2 for a bad option,
model file or source (nothing is written), 130 on Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd

from skinlesion import CLASSES, PipelineError, cli, params
from skinlesion.data import archives
from skinlesion.evaluation import evaluate, external
from skinlesion.predict import check_output, count, fraction, load_predictor
from skinlesion.untrusted import first_line, refuse_overwrite

log = logging.getLogger("skinlesion.score")


def read_labels(labels: Path) -> set[str]:
    """The image_ids of the --labels CSV."""
    fix = "give a CSV with an image_id column (e.g. data/split/test.csv)"
    try:
        wanted = pd.read_csv(labels, dtype=str)
    except FileNotFoundError:
        raise PipelineError(f"--labels {labels}: no such file; {fix}") from None
    except IsADirectoryError:
        raise PipelineError(f"--labels {labels} is a folder; {fix}") from None
    except PermissionError:
        raise PipelineError(f"--labels {labels}: cannot be read (permission denied); give this user read "
                            f"access to it") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"--labels {labels}: not a readable CSV ({first_line(error)}); {fix}") \
            from None
    if "image_id" not in wanted:
        raise PipelineError(f"--labels {labels}: no image_id column; {fix}")
    return set(wanted["image_id"].dropna())


def score_source(model_path: Path, source: Path, labels: Path | None, out: Path, batch_size: int,
                 mel_specificity: float) -> int:
    check_output(out, "metrics.json")
    refuse_overwrite(out, [model_path, labels, source])
    wanted = read_labels(labels) if labels is not None else None
    predictor = load_predictor(model_path)
    info = predictor.info
    if list(info.classes) != list(CLASSES):
        raise PipelineError(f"{model_path} predicts {info.classes}, not the HAM10000 classes")

    def labelled(frame):
        if wanted is None:
            return frame
        unknown = sorted(wanted - set(frame["image_id"]))
        if unknown:
            raise PipelineError(f"--labels {labels}: {len(unknown)} image_id(s) not in {source}: "
                                f"{archives.names(unknown)}; give the labels of this source")
        return frame[frame["image_id"].isin(wanted)]

    # a labelled set is scored whole: the intervals resample its lesions
    # Every file of the source may be read (its metadata CSV, its images): none may be -o, bar an
    # earlier metrics file.
    reads = lambda files: refuse_overwrite(out, [f for f in files if f.suffix.lower() != ".json"])
    scored, pixels, errors, listed = external.load_labelled([source], info.image_size,
                                                            select=labelled, check=reads)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not len(scored):
        raise PipelineError(f"none of the {listed} image(s) of {source} could be read; nothing to score")
    settings = params.Evaluate(batch_size=batch_size, mel_specificity=mel_specificity)
    evaluate.evaluate_split(predictor, scored, pixels, settings, metrics_path=out, plots_dir=None,
                            progress="score")
    log.info("wrote %s: %d image(s) scored, %d failed", out, len(scored), len(errors))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m skinlesion.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model file (models/model.pt) or its ONNX export (models/model.onnx)")
    parser.add_argument("source", type=Path, help="a folder or zip in HAM10000 layout")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the metrics, as JSON")
    parser.add_argument("--labels", type=Path, help="only the image_ids of this CSV (e.g. data/split/test.csv)")
    parser.add_argument("--batch-size", type=count, default=128)
    parser.add_argument("--mel-specificity", type=fraction, default=0.9)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return cli.guarded("", lambda: score_source(args.model, args.source, args.labels, args.out, args.batch_size,
                                                args.mel_specificity), input_error=cli.USAGE)


if __name__ == "__main__":
    sys.exit(main())
