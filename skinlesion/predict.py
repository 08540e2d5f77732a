"""Use a saved model on new images, and score it on any labelled source.

    python -m skinlesion.predict MODEL INPUT [INPUT ...] -o predictions.csv
    python -m skinlesion.predict --score MODEL SOURCE [--labels CSV] -o metrics.json

MODEL is a model file (models/model.pt) or its ONNX export (models/model.onnx,
run on ONNX Runtime with the same views and scoring). INPUT is an image, a folder
or a zip (zips inside are read too). SOURCE is any folder or zip in HAM10000 layout. A file that is not a readable image gets one
line on stderr and the rest are still processed; the exit code is 1 if any file
failed, 2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import UnidentifiedImageError

from skinlesion import CLASSES, PipelineError, modelfile
from skinlesion.evaluation import inference, metrics
from skinlesion.files import write_csv, write_json
from skinlesion.data.prepare import load_image
from skinlesion.progress import bar
from skinlesion.data import archives, assemble

log = logging.getLogger("skinlesion.predict")
MAX_BYTES = 64 * 2**30


def decode_all(members: list[archives.Member], size: int) -> tuple[list[int], np.ndarray, list[str]]:
    """Decode ``members`` at ``size``; returns the indices that worked, their pixels,
    and one error line per file that did not."""

    def decode(member):
        try:
            return load_image(BytesIO(member.read()), size), None
        except UnidentifiedImageError:
            return None, f"{member.origin}: not an image (no format Pillow recognises)"
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported, not fatal
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            return None, f"{member.origin}: not a readable image ({reason})"

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = list(bar(pool.map(decode, members), total=len(members), desc="decode", unit="img"))
    ok = [i for i, (pixels, _) in enumerate(results) if pixels is not None]
    errors = [error for _, error in results if error]
    pixels = np.stack([results[i][0] for i in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
    return ok, pixels, errors


def load_predictor(model_path: Path):
    """``predict(pixels, batch_size=, progress=)`` giving scored probabilities, and the
    model's description, for a model file or (a name ending in .onnx) its ONNX export."""
    if model_path.suffix.lower() == ".onnx":
        from skinlesion.deployment import runtime  # ONNX Runtime is loaded only for an ONNX file

        session, info = runtime.load(model_path)
        return partial(runtime.predict, session, info), info
    model, info = modelfile.load(model_path)
    return partial(inference.predict, model, info), info


def predict_files(model_path: Path, inputs: list[Path], out: Path, batch_size: int) -> int:
    predict, info = load_predictor(model_path)
    with tempfile.TemporaryDirectory() as scratch:
        collector = archives.Collector(Path(scratch), MAX_BYTES)
        try:
            members = collector.collect(inputs)
            ok, pixels, errors = decode_all(members, info["image_size"])
        finally:
            collector.close()
    probabilities = predict(pixels, batch_size=batch_size, progress="predict")
    frame = pd.DataFrame({"file": [members[i].origin for i in ok],
                          "image_id": [Path(members[i].name).stem for i in ok]})
    for index, name in enumerate(info["classes"]):
        frame[f"p_{name}"] = probabilities[:, index].round(6)
    frame["predicted"] = [info["classes"][i] for i in probabilities.argmax(axis=1)] if len(ok) else []
    frame["confidence"] = probabilities.max(axis=1).round(6) if len(ok) else []
    write_csv(out, frame)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    log.info("wrote %s: %d image(s) predicted, %d failed", out, len(ok), len(errors))
    return 1 if errors else 0


def score_source(model_path: Path, source: Path, labels: Path | None, out: Path, batch_size: int,
                 mel_specificity: float) -> int:
    predict, info = load_predictor(model_path)
    if list(info["classes"]) != list(CLASSES):
        raise PipelineError(f"{model_path} predicts {info['classes']}, not the HAM10000 classes")
    with tempfile.TemporaryDirectory() as scratch:
        collector = archives.Collector(Path(scratch), MAX_BYTES)
        try:
            found = assemble.index(collector, collector.collect([source]))
            frame = found.metadata
            if labels is not None:
                wanted = pd.read_csv(labels, dtype=str)
                if "image_id" not in wanted:
                    raise PipelineError(f"{labels}: no image_id column")
                unknown = sorted(set(wanted["image_id"]) - set(frame["image_id"]))
                if unknown:
                    raise PipelineError(f"{labels}: {len(unknown)} image_id(s) not in {source}: {unknown[:5]}")
                frame = frame[frame["image_id"].isin(set(wanted["image_id"]))].reset_index(drop=True)
            members = [found.images[image_id] for image_id in frame["image_id"]]
            ok, pixels, errors = decode_all(members, info["image_size"])
        finally:
            collector.close()
    truth = frame["dx"].map(CLASSES.index).to_numpy()[ok]
    probabilities = predict(pixels, batch_size=batch_size, progress="score")
    write_json(out, metrics.evaluate(truth, probabilities, mel_specificity=mel_specificity,
                                     mel_threshold=(info.get("scoring") or {}).get("mel_threshold")))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    log.info("wrote %s: %d image(s) scored, %d failed", out, len(ok), len(errors))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model file (models/model.pt) or its ONNX export (models/model.onnx)")
    parser.add_argument("inputs", type=Path, nargs="+", help="images, folders or zips (with --score: one source)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="CSV of probabilities (JSON with --score)")
    parser.add_argument("--score", action="store_true", help="score on a labelled HAM10000-layout source")
    parser.add_argument("--labels", type=Path, help="with --score: only the image_ids of this CSV (e.g. data/split/test.csv)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mel-specificity", type=float, default=0.9)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.score:
            if len(args.inputs) != 1:
                raise PipelineError("--score takes one source (a folder or zip in HAM10000 layout)")
            return score_source(args.model, args.inputs[0], args.labels, args.out, args.batch_size,
                                args.mel_specificity)
        return predict_files(args.model, args.inputs, args.out, args.batch_size)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
