"""DVC stage `export`: the calibrated model as models/model.onnx, checked against
PyTorch before it is kept (skinlesion.deployment.export)."""

import logging
from pathlib import Path

from skinlesion import modelfile
from skinlesion.cli import run_stage
from skinlesion.deployment import export


def main(params):
    source, target = Path("models/model.pt"), Path("models/model.onnx")
    model, info = modelfile.load(source)
    difference = export.export(model, info, target)
    logging.info("wrote %s (%s, opset %d, %.1f MB); largest logit difference from PyTorch %.2g", target,
                 info.architecture, export.OPSET, target.stat().st_size / 1e6, difference)


if __name__ == "__main__":
    run_stage("export", main)
