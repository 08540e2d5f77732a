"""Reproducible, leakage-free HAM10000 skin-lesion classification.

Each DVC stage in ``stages/`` is a thin wrapper over one module, in a folder named
for its phase: ``data.download``, ``data.prepare``, ``data.split``, ``data.balance``;
``training.train``; ``evaluation.calibrate``, ``deployment.export``,
``evaluation.evaluate``, ``evaluation.external``, ``evaluation.card`` and
``evaluation.explain``. ``predict`` and ``app`` are the command-line and web use of a
saved model; ``params`` hands each stage the checked params it declares.
"""

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
"""The seven HAM10000 diagnoses, in the fixed order used for labels everywhere."""

METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
"""The official HAM10000 metadata columns, in their published order."""


class PipelineError(Exception):
    """A problem with input or configuration that the user can fix.

    Stage scripts print its message as one line and exit non-zero; anything else
    is a bug and keeps its traceback.
    """
