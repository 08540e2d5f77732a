"""Reproducible, leakage-free HAM10000 skin-lesion classification.

Each DVC stage in ``stages/`` is a thin wrapper over one module here:
``sources`` (download), ``prepare`` (working resolution), ``splitting``,
``balancing`` (with ``augmentation``), ``training`` (with ``models``, ``loader``,
``losses``, ``modelfile``), ``metrics`` (evaluate, with ``evaluation`` and
``inference``) and ``explanations`` (explain). ``predict`` is the command-line use
of a saved model; ``params`` hands each stage the params it declares.
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
