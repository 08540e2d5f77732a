"""Use a saved model on new images (scoring it on a labelled source is skinlesion.score).

    python -m skinlesion.predict MODEL INPUT [INPUT ...] -o predictions.csv

MODEL is a model file (models/model.pt) or its ONNX export (models/model.onnx, run on
ONNX Runtime with the same views and scoring). INPUT is an image, a folder or a zip (zips inside are read too). SOURCE is any
folder or zip in HAM10000 layout. What that layout names as lesion masks
(``*_segmentation.png``), metadata tables (``.csv``) and checksum lists, hidden and
system files (``.DS_Store``, ``Thumbs.db``) and an earlier output are skipped, with one
line saying how many (``--include-masks`` classifies masks too). Images are decoded
exactly as the pipeline decodes them (skinlesion.data.images). A file that is not a
usable image gets one line on stderr and the rest are still processed. Exit code: 0
when every file was classified, 1 if any file failed or the output could not be
written, 2 for a bad option, model file or input (nothing is written), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion import PipelineError, cli
from skinlesion.data import archives
from skinlesion.data.images import Unusable, decode_all, load_image, printable  # noqa: F401 - decode_all: the API
from skinlesion.data.patient_input import column_problem, duplicate_problem, first_problem
from skinlesion.evaluation.predictor import Predictor
from skinlesion.evaluation.scope import NOTICE
from skinlesion.files import write_csv
from skinlesion.modelinfo import ModelInfo
from skinlesion.progress import bar
from skinlesion.untrusted import first_line, refuse_overwrite

log = logging.getLogger("skinlesion.predict")
SCORE_MOVED = ("note: `predict --score` is now its own command, `python -m skinlesion.score MODEL SOURCE -o "
               "metrics.json` (same options); this form still works")
MAX_BYTES = 64 * 2**30
# Images decoded and held at once: memory stays at one chunk of pixels however large
# the input (2048 at 128 px is 100 MB; 100,000 images at once would be 4.9 GB, twice
# that while stacked).
CHUNK = 2048
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
OUTPUT_HEADER = b"file,image_id,"


def classify(predictor: Predictor, members: list[archives.Member], batch_size: int, desc: str,
             patient: pd.DataFrame | None = None) -> tuple[list[int], np.ndarray, list[str], np.ndarray | None]:
    """Decode and classify ``members`` a chunk at a time; returns the indices that
    worked, their probabilities, one error line per file that did not, and their
    out-of-scope scores (None for a model without one). ``patient``: the metadata table
    (indexed by image_id, the file name's stem) for a model that takes it."""
    ok, parts, errors, scores = [], [], [], []
    with bar(total=len(members), desc=desc, unit="img") as progress:
        for start in range(0, len(members), CHUNK):
            chunk = members[start:start + CHUNK]
            found, pixels, failed = decode_all(chunk, predictor.info.image_size)
            rows = None
            if patient is not None:
                ids = [Path(chunk[i].name).stem for i in found]
                rows = predictor.patient_rows(patient.loc[ids].reset_index(drop=True))
            _, probabilities, scope_scores = predictor.answer(pixels, batch_size=batch_size, patient=rows)
            parts.append(probabilities)
            scores.append(scope_scores)
            ok += [start + i for i in found]
            errors += failed
            progress.update(len(chunk))
    probabilities = np.concatenate(parts) if parts else np.zeros((0, len(predictor.classes)), np.float32)
    scored = [part for part in scores if part is not None]
    return ok, probabilities, errors, (np.concatenate(scored) if scored else None)


def load_predictor(model_path: Path) -> Predictor:
    """The predictor for a model file, or (a name ending in .onnx) its ONNX export on ONNX
    Runtime, which is imported only then."""
    if model_path.suffix.lower() == ".onnx":
        from skinlesion.deployment import runtime

        return runtime.OnnxPredictor(*runtime.load(model_path))
    from skinlesion import modelfile
    from skinlesion.evaluation import inference

    return inference.TorchPredictor(*modelfile.load(model_path))


def check_output(out: Path, example: str) -> None:
    """Refuse an unusable -o before any work, not after every image is decoded."""
    if out.is_dir():
        raise PipelineError(f"-o {out} is a folder; name a file in it, e.g. -o {out / example}")
    folder = out.parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise PipelineError(f"-o {out}: {folder} is not a folder; choose another -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PipelineError(f"-o {out}: cannot write into {folder} (permission denied, or a read-only file "
                            f"system); choose another -o")


def earlier_output(path: Path) -> bool:
    """Whether ``path`` holds what this command writes (its CSV header), so that it may be
    skipped and replaced; anything else at -o is an input, never written over."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(OUTPUT_HEADER)) == OUTPUT_HEADER
    except OSError:
        return False


def to_classify(members: list[archives.Member], out: Path, include_masks: bool) -> list[archives.Member]:
    """``members`` less what is not an input: what the HAM10000 layout names as lesion
    masks (unless asked for), metadata tables and checksum lists; hidden and system
    files; the output of an earlier run into the same folder. One log line says what
    was skipped."""
    skipped = {"mask": 0, "table": 0, "hidden": 0, "earlier": 0}
    kept = []
    for member in members:
        if not include_masks and archives.MASK_NAME.match(member.name):
            skipped["mask"] += 1
        elif Path(member.name).suffix.lower() in archives.TABLE_SUFFIXES or member.name == archives.CHECKSUM_FILE:
            skipped["table"] += 1
        elif member.name.startswith(".") or member.name.lower() in SYSTEM_FILES:
            skipped["hidden"] += 1
        elif member.path is not None and member.name == out.name and member.path.resolve() == out.resolve() \
                and earlier_output(member.path):
            skipped["earlier"] += 1
        else:
            kept.append(member)
    said = {"mask": "lesion mask(s) (*_segmentation.png; --include-masks classifies them too)",
            "table": "table(s) or checksum list(s) (.csv, .tab, .tsv, SHA256SUMS)",
            "hidden": "hidden or system file(s)", "earlier": f"earlier output(s) ({out})"}
    if any(skipped.values()):
        log.info("skipped %s", ", ".join(f"{count} {said[kind]}" for kind, count in skipped.items() if count))
    return kept


def read_patient(path: Path | None, info: ModelInfo, model_path: Path) -> pd.DataFrame | None:
    """The --metadata table, indexed by image_id, when the model takes the patient's
    metadata; a one-line refusal when one is missing or not wanted."""
    needed = info.patient is not None
    if needed and path is None:
        raise PipelineError(f"{model_path} takes the patient's metadata beside each image; give --metadata CSV "
                            f"with columns image_id, age, sex, localization (blank or 'unknown' where not known)")
    if not needed:
        if path is not None:
            raise PipelineError(f"--metadata: {model_path} takes no patient metadata; leave the option out")
        return None
    fix = "give a CSV with columns image_id, age, sex, localization"
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"--metadata {path}: not a readable CSV ({first_line(error)}); {fix}") from None
    problem = column_problem(table.columns) or duplicate_problem(table)
    if problem:
        raise PipelineError(f"--metadata {path}: {problem}")
    found = first_problem(table, info.patient.model_dump())
    if found:
        row, problem = found
        raise PipelineError(f"--metadata {path}, line {row + 2} ({table['image_id'].iloc[row]}): {problem}")
    return table.set_index("image_id")


def predict_files(model_path: Path, inputs: list[Path], out: Path, batch_size: int, *,
                  include_masks: bool = False, metadata: Path | None = None) -> int:
    check_output(out, "predictions.csv")
    predictor = load_predictor(model_path)
    info = predictor.info
    patient = read_patient(metadata, info, model_path)
    with tempfile.TemporaryDirectory() as scratch:
        collector = archives.Collector(Path(scratch), MAX_BYTES)
        try:
            collected = collector.collect(inputs)
            members = to_classify(collected, out, include_masks)
            refuse_overwrite(out, [model_path, metadata, *collector.on_disk(members)])
            if not members:
                raise PipelineError(f"no files to classify in {', '.join(map(str, inputs))}; give images, "
                                    f"folders or zips of them")
            if patient is not None:
                absent = sorted({Path(m.name).stem for m in members} - set(patient.index))
                if absent:
                    raise PipelineError(f"--metadata {metadata}: no row for {len(absent)} image(s), e.g. {absent[0]}; "
                                        f"add a row per image (blank values are allowed)")
            log.info("classifying %d file(s)", len(members))
            ok, probabilities, errors, scores = classify(predictor, members, batch_size, "predict", patient)
        finally:
            collector.close()
    frame = pd.DataFrame({"file": [printable(members[i].origin) for i in ok],
                          "image_id": [printable(Path(members[i].name).stem) for i in ok]})
    for index, name in enumerate(info.classes):
        frame[f"p_{name}"] = probabilities[:, index].round(6)
    frame["predicted"] = [info.classes[i] for i in probabilities.argmax(axis=1)] if len(ok) else []
    frame["confidence"] = probabilities.max(axis=1).round(6) if len(ok) else []
    flags = predictor.melanoma_flags(probabilities)  # the operating point chosen on validation
    in_scope = predictor.in_scope(scores)
    if in_scope is not None:  # an image unlike the training data gets no diagnosis and raises no flag
        frame["in_scope"] = in_scope.astype(int)
        frame["scope_score"] = np.round(scores, 4)
        flags = None if flags is None else flags & in_scope
    if flags is not None:
        frame["melanoma_flag"] = flags.astype(int)
    write_csv(out, frame, for_people=True)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    outside = "" if in_scope is None else f", {int((~in_scope).sum())} of them out of scope ({NOTICE})"
    log.info("wrote %s: %d image(s) predicted%s, %d failed", out, len(ok), outside, len(errors))
    return 1 if errors else 0


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give a number of images, e.g. 64")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1; e.g. 0.9")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m skinlesion.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model file (models/model.pt) or its ONNX export (models/model.onnx)")
    parser.add_argument("inputs", type=Path, nargs="+", help="images, folders or zips")
    parser.add_argument("-o", "--out", type=Path, required=True, help="CSV of probabilities")
    parser.add_argument("--score", action="store_true",
                        help="the earlier form of `python -m skinlesion.score MODEL SOURCE -o metrics.json`")
    parser.add_argument("--labels", type=Path, help="with --score: only the image_ids of this CSV")
    parser.add_argument("--include-masks", action="store_true",
                        help="classify lesion masks (*_segmentation.png) too; they are skipped by default")
    parser.add_argument("--metadata", type=Path,
                        help="for a model trained with train.metadata: a CSV of image_id, age, sex, localization")
    parser.add_argument("--batch-size", type=count, default=128)
    parser.add_argument("--mel-specificity", type=fraction, default=0.9)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def work() -> int:
        if args.score:
            from skinlesion import score

            print(SCORE_MOVED, file=sys.stderr)
            if len(args.inputs) != 1:
                raise PipelineError("--score takes one source (a folder or zip in HAM10000 layout)")
            if args.include_masks:
                raise PipelineError("--include-masks applies to predictions, not to --score")
            if args.metadata is not None:
                raise PipelineError("--metadata applies to predictions; --score reads the source's own metadata CSV")
            return score.score_source(args.model, args.inputs[0], args.labels, args.out, args.batch_size,
                                args.mel_specificity)
        if args.labels is not None:
            raise PipelineError("--labels applies to scoring: `python -m skinlesion.score MODEL SOURCE --labels CSV "
                                "-o metrics.json`")
        return predict_files(args.model, args.inputs, args.out, args.batch_size, include_masks=args.include_masks,
                             metadata=args.metadata)

    return cli.guarded("", work, input_error=cli.USAGE)


if __name__ == "__main__":
    sys.exit(main())
