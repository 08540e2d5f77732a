"""The ISIC 2018 Task 3 archives (the training set, a download source; the test set
with its public ground truth, an external set), and HAM10000-style metadata built
from their one-hot ground truth and, where published, lesion groupings."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import requests

from skinlesion import CLASSES, PipelineError
from skinlesion.data import metadata
from skinlesion.data.archives import CHECKSUM_FILE, IMAGE_NAME, SHOWN, check_member_name, names
from skinlesion.data.checksums import read_checksums, write_checksums
from skinlesion.data.http import fetch
from skinlesion.files import file_digest
from skinlesion.untrusted import first_line

MAX_TABLE_BYTES = 64 * 2**20

ISIC2018_FILES = (
    "ISIC2018_Task3_Training_Input.zip",
    "ISIC2018_Task3_Training_GroundTruth.zip",
    "ISIC2018_Task3_Training_LesionGroupings.csv",
)
# The test set (1,512 images; ground truth public since the challenge closed). No lesion
# groupings are published for it, so each image counts as its own lesion.
ISIC2018_TEST_FILES = (
    "ISIC2018_Task3_Test_Input.zip",
    "ISIC2018_Task3_Test_GroundTruth.zip",
)


def _recorded_checksums(cache: Path) -> dict[str, str]:
    record = cache / CHECKSUM_FILE
    return read_checksums(record) if record.is_file() else {}


def download_isic2018(base_url: str, cache: Path, *, retries: int, session: requests.Session,
                      files: tuple[str, ...] = ISIC2018_FILES) -> tuple[list[Path], dict]:
    """Fetch ISIC 2018 Task 3 archives (``files``: the training set's unless told). No checksums are published for
    them, so the SHA-256 of what first arrived is recorded in the cache's SHA256SUMS
    and every later download must match it."""
    base_url = base_url.rstrip("/")
    known = _recorded_checksums(cache)
    paths, record = [], []
    for name in files:
        expected = ("sha256", known[name]) if name in known else None
        try:
            path = fetch(f"{base_url}/{name}", cache / name, checksum=expected, retries=retries,
                         session=session)
        except PipelineError as error:
            if expected and "checksum mismatch" in str(error):
                raise PipelineError(
                    f"{error}. The file differs from the copy first downloaded (recorded in "
                    f"{cache / CHECKSUM_FILE}); if the change is expected, delete that line"
                ) from None
            raise
        if name not in known:  # a first download is recorded only once it is what it claims to be
            try:
                _validate(name, path)
            except PipelineError as error:
                path.unlink(missing_ok=True)
                raise PipelineError(f"{error}. The download was deleted and no checksum recorded; run again to "
                                    f"download it afresh, or check {base_url}") from None
        digest = file_digest(path)
        known[name] = digest
        paths.append(path)
        record.append({"name": name, "url": f"{base_url}/{name}", "sha256": digest})
    write_checksums(cache / CHECKSUM_FILE, known)
    return paths, {"files": record}



def _validate(name: str, path: Path) -> None:
    """Raise PipelineError unless ``path`` is the kind of file the ISIC archive ``name`` is:
    an image zip with JPEGs, a ground-truth zip with its one-hot CSV, the groupings CSV."""
    if name.endswith("_GroundTruth.zip"):
        try:
            isic2018_metadata(path, None)
        except PipelineError as error:  # its advice (delete the file) is what the caller does
            raise PipelineError(str(error).split("; delete it and run again")[0]) from None
    elif name.endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise PipelineError(f"{name}: not a zip ({first_line(error)}); the server sent something "
                                f"else (an error page?)") from None
        for member in members:
            check_member_name(name, member)
        if not any(IMAGE_NAME.match(member.rsplit("/", 1)[-1]) for member in members):
            raise PipelineError(f"{name}: a zip without a single JPEG image; not the ISIC 2018 images")
    else:
        try:
            columns = pd.read_csv(path, dtype=str, nrows=5).columns
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise PipelineError(f"{name}: not a readable CSV ({first_line(error)}); the server sent "
                                f"something else (an error page?)") from None
        if not {"image", "lesion_id"} <= set(columns):
            raise PipelineError(f"{name}: expected columns image, lesion_id; not the ISIC 2018 lesion groupings")


def isic2018_metadata(ground_truth_zip: Path, groupings_csv: Path | None) -> pd.DataFrame:
    """HAM10000-style metadata from the ISIC 2018 one-hot ground truth and the lesion
    groupings (age, sex and localization are not published there and stay empty).
    Without groupings (the test set), each image is its own lesion."""
    try:
        with zipfile.ZipFile(ground_truth_zip) as archive:
            tables = [n for n in archive.namelist() if n.lower().endswith(".csv")]
            if len(tables) != 1:
                raise PipelineError(f"{ground_truth_zip.name}: expected one CSV inside, found {tables}")
            check_member_name(ground_truth_zip.name, tables[0])
            if archive.getinfo(tables[0]).file_size > MAX_TABLE_BYTES:
                raise PipelineError(f"{ground_truth_zip.name}: its CSV expands to more than "
                                    f"{MAX_TABLE_BYTES // 2**20} MiB (the real one is under 1 MiB); refusing it")
            with archive.open(tables[0]) as handle:
                truth = pd.read_csv(handle)
    except (zipfile.BadZipFile, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"{ground_truth_zip}: not a readable ground-truth zip ({first_line(error)}); "
                            f"delete it and run again to download it afresh") from None
    columns = [name.upper() for name in CLASSES]
    missing = [c for c in ["image", *columns] if c not in truth.columns]
    if missing:
        raise PipelineError(f"{ground_truth_zip.name}: ground truth lacks column(s) {missing}")
    one_hot = truth[columns].apply(pd.to_numeric, errors="coerce").to_numpy()  # text: NaN, refused below
    bad = (one_hot.sum(axis=1) != 1) | ~((one_hot == 0) | (one_hot == 1)).all(axis=1)
    if bad.any():
        lines = [str(i + 2) for i in bad.nonzero()[0][:SHOWN]]
        raise PipelineError(f"{ground_truth_zip.name}: rows on line(s) {', '.join(lines)} do not "
                            f"name exactly one diagnosis")
    truth = pd.DataFrame({"image_id": truth["image"].astype(str),
                          "dx": [CLASSES[i] for i in one_hot.argmax(axis=1)]})
    if groupings_csv is None:
        truth["lesion_id"] = truth["image_id"]
        for column in ("dx_type", "age", "sex", "localization"):
            truth[column] = ""
        return metadata.validate(truth, ground_truth_zip.name)
    groups = pd.read_csv(groupings_csv, dtype=str, keep_default_na=False)
    if not {"image", "lesion_id"} <= set(groups.columns):
        raise PipelineError(f"{groupings_csv.name}: expected columns image, lesion_id")
    groups = groups.rename(columns={"image": "image_id", "diagnosis_confirm_type": "dx_type"})
    merged = truth.merge(groups, on="image_id", how="left", indicator=True)
    ungrouped = merged.loc[merged["_merge"] != "both", "image_id"].tolist()
    if ungrouped:
        raise PipelineError(f"{groupings_csv.name}: no lesion_id for {len(ungrouped)} image(s): "
                            f"{names(ungrouped)}")
    for column in ("dx_type", "age", "sex", "localization"):
        if column not in merged:
            merged[column] = ""
    return metadata.validate(merged, f"{ground_truth_zip.name} + {groupings_csv.name}")


