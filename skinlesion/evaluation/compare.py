"""Compare two scored sets, for example the test split of a lesion-grouped run against
that of a leaky (``split.group_by: image``) run: their headline figures and the
difference with a 95 % interval, resampling each set's lesions.

    python -m skinlesion.evaluation.compare A/predictions.csv B/predictions.csv \
        --lesions data/raw/metadata.csv

Each predictions CSV is what ``evaluate`` writes (``plots/evaluate/predictions.csv``:
image_id, one p_CLASS column per class, actual); ``--lesions`` is any CSV with image_id
and lesion_id covering both (the raw metadata does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from skinlesion import CLASSES, PipelineError, cli
from skinlesion.evaluation.metrics import difference_intervals
from skinlesion.untrusted import first_line


def read_csv(path: Path, needed: list[str], what: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "actual": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: not a readable CSV ({first_line(error)}); give {what}") from None
    missing = [column for column in needed if column not in frame]
    if missing:
        raise PipelineError(f"{path}: no column(s) {', '.join(missing)}; give {what}")
    return frame


def scored_set(path: Path, lesion_of: pd.Series) -> tuple:
    what = "a predictions.csv written by the evaluate stage"
    frame = read_csv(path, ["image_id", "actual", *[f"p_{name}" for name in CLASSES]], what)
    unknown = sorted(set(frame["actual"]) - set(CLASSES))
    if unknown:
        raise PipelineError(f"{path}: unknown class(es) {unknown} in column actual; expected {', '.join(CLASSES)}")
    missing = sorted(set(frame["image_id"]) - set(lesion_of.index))
    if missing:
        raise PipelineError(f"{path}: {len(missing)} image_id(s) not in the --lesions CSV, e.g. {missing[0]}; "
                            f"give a metadata CSV that covers both sets (data/raw/metadata.csv)")
    probabilities = frame[[f"p_{name}" for name in CLASSES]].to_numpy(dtype=float)
    return frame["actual"].map(CLASSES.index).to_numpy(), probabilities, lesion_of[frame["image_id"]].to_numpy()


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m skinlesion.evaluation.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first predictions CSV (the baseline)")
    parser.add_argument("b", type=Path, help="the second predictions CSV")
    parser.add_argument("--lesions", type=Path, required=True, help="a CSV with image_id and lesion_id for both sets")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    def work() -> int:
        if args.resamples < 1:
            raise PipelineError(f"--resamples {args.resamples}: give a whole number of at least 1, e.g. 1000")
        table = read_csv(args.lesions, ["image_id", "lesion_id"], "a CSV with image_id and lesion_id columns")
        lesion_of = table.drop_duplicates("image_id").set_index("image_id")["lesion_id"]
        result = difference_intervals(scored_set(args.a, lesion_of), scored_set(args.b, lesion_of),
                                      resamples=args.resamples, seed=args.seed)
        print(json.dumps(result, indent=2))
        print(f"\n| figure | {args.a} | {args.b} | difference [95 % interval] |\n|---|---|---|---|")
        for key, row in result.items():
            print(f"| {key} | {row['a']:.3f} | {row['b']:.3f} | {row['difference']:+.3f} "
                  f"[{row['ci95']['low']:+.3f}, {row['ci95']['high']:+.3f}] |")
        return 0

    return cli.guarded("", work, input_error=cli.USAGE)


if __name__ == "__main__":
    sys.exit(main())
