"""Local sources (folder or zip) and what arrives from any source: validated,
canonical, reported, and never half-written."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from skinlesion import PipelineError, params
from skinlesion.data.download import download as download_source
from skinlesion.files import file_digest
from tests.conftest import group

PARAMS = {"source": "local", "retries": 0, "max_unpacked_gb": 1}


def download(path: Path, tmp_path: Path, **extra) -> dict:
    return download_source(group("download", **{**PARAMS, "path": str(path), **extra}), tmp_path / "raw",
                           tmp_path / "cache")


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "source"
    shutil.copytree(folder, target)
    return target


def test_folder_and_zip_layouts_give_the_same_canonical_output(synthetic_folder, synthetic_zips, tmp_path):
    a = download(synthetic_folder, tmp_path / "a")
    b = download(synthetic_zips, tmp_path / "b")
    frame = pd.read_csv(synthetic_folder / "HAM10000_metadata.csv")
    assert a["images"] == b["images"] == len(frame) and a["masks"] == len(frame)
    assert a["class_counts"] == b["class_counts"]
    raw = pd.read_csv(tmp_path / "a/raw/metadata.csv", dtype=str, keep_default_na=False)
    assert list(raw.columns) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    assert list(raw.image_id) == sorted(frame.image_id)
    # Images arrive byte for byte: the synthetic generator was seeded the same way for both.
    one = sorted((tmp_path / "a/raw/images").iterdir())[0]
    assert file_digest(one) == file_digest(tmp_path / "b/raw/images" / one.name)
    assert (tmp_path / "a/raw/masks" / one.name.replace(".jpg", ".png")).exists()


def test_a_zip_of_the_whole_folder_with_nested_zips(synthetic_zips, tmp_path):
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        for file in synthetic_zips.iterdir():
            archive.write(file, f"HAM10000/{file.name}")
    record = download(bundle, tmp_path)
    assert record["images"] == len(pd.read_csv(synthetic_zips / "HAM10000_metadata.csv"))


def test_unlisted_files_are_reported_by_name_and_left_out(synthetic_folder, tmp_path, caplog):
    source = copy_of(synthetic_folder, tmp_path)
    (source / "LICENSE.txt").write_text("CC BY-NC 4.0")
    stray = source / "HAM10000_images_part_1" / "ISIC_9999999.jpg"
    shutil.copy(next((source / "HAM10000_images_part_1").iterdir()), stray)
    record = download(source, tmp_path)
    assert record["left_out"]["files_not_images"] == ["source/LICENSE.txt"]
    assert record["left_out"]["images_not_in_metadata"] == ["source/HAM10000_images_part_1/ISIC_9999999.jpg"]
    assert not (tmp_path / "raw/images/ISIC_9999999.jpg").exists()
    assert "ISIC_9999999.jpg" in caplog.text and "LICENSE.txt" in caplog.text


def test_missing_image_is_named_and_nothing_is_written(synthetic_folder, tmp_path):
    source = copy_of(synthetic_folder, tmp_path)
    victim = sorted((source / "HAM10000_images_part_2").iterdir())[3]
    victim.unlink()
    with pytest.raises(PipelineError, match=f"1 image.*missing: {victim.stem}"):
        download(source, tmp_path)
    assert not (tmp_path / "raw").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # no temporary folders left either


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_an_image", "floating_point"])
def test_undecodable_image_is_named(synthetic_folder, tmp_path, damage):
    source = copy_of(synthetic_folder, tmp_path)
    victim = sorted((source / "HAM10000_images_part_1").iterdir())[0]
    data = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "not_an_image":
        victim.write_bytes(b"<html>404</html>")
    else:
        from PIL import Image

        buffer = io.BytesIO()
        Image.open(victim).convert("F").save(buffer, "TIFF")
        victim.write_bytes(buffer.getvalue())
    with pytest.raises(PipelineError, match=rf"{victim.name} (is not a readable image|has mode F|is empty \(0 bytes\)|"
                                            rf"is not an image \(no format Pillow recognises\))"):
        download(source, tmp_path)
    assert not (tmp_path / "raw").exists()


def test_broken_metadata_file_is_named_with_its_problem(synthetic_folder, tmp_path):
    source = copy_of(synthetic_folder, tmp_path)
    path = source / "HAM10000_metadata.csv"
    pd.read_csv(path).drop(columns=["dx", "lesion_id"]).to_csv(path, index=False)
    with pytest.raises(PipelineError, match="HAM10000_metadata.csv: missing column\\(s\\) lesion_id, dx"):
        download(source, tmp_path)


def test_two_files_for_one_image_id(synthetic_folder, tmp_path):
    source = copy_of(synthetic_folder, tmp_path)
    first = sorted((source / "HAM10000_images_part_1").iterdir())[0]
    shutil.copy(first, source / "HAM10000_images_part_2" / first.name)
    with pytest.raises(PipelineError, match=f"two files for image_id {first.stem}"):
        download(source, tmp_path)


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "a/../../evil.jpg", "C:/evil.jpg"])
def test_zip_member_escaping_the_target_is_refused(synthetic_zips, tmp_path, name):
    source = copy_of(synthetic_zips, tmp_path)
    with zipfile.ZipFile(source / "HAM10000_images.zip", "a") as archive:
        archive.writestr(name, b"x")
    with pytest.raises(PipelineError, match="points outside the folder"):
        download(source, tmp_path)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "evil.jpg").exists()


def test_zip_expanding_past_the_limit_is_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * (3 << 20))
    with pytest.raises(PipelineError, match="expand to more than"):
        download(bomb, tmp_path, max_unpacked_gb=2 / 1024)
    assert not (tmp_path / "raw").exists()


def test_published_checksums_of_a_local_copy_are_checked(synthetic_zips, tmp_path):
    source = copy_of(synthetic_zips, tmp_path)
    sums = "".join(f"{file_digest(source / n)}  {n}\n" for n in ("HAM10000_images.zip", "HAM10000_metadata.csv"))
    (source / "SHA256SUMS").write_text(sums)
    record = download(source, tmp_path / "ok")
    assert set(record["source"]["sha256_verified"]) == {"HAM10000_images.zip", "HAM10000_metadata.csv"}
    assert record["left_out"]["files_not_images"] == []  # SHA256SUMS is used, not left out

    with zipfile.ZipFile(source / "HAM10000_images.zip", "a") as archive:
        archive.writestr("extra.txt", b"changed")
    with pytest.raises(PipelineError, match="HAM10000_images.zip: SHA-256 .* does not match"):
        download(source, tmp_path / "bad")


def test_unknown_source_and_missing_path(tmp_path):
    with pytest.raises(PipelineError, match="download.source is 'kaggle'; expected one of dataverse, isic2018 or local"):
        params.check(params.schema_at("download"), {**PARAMS, "source": "kaggle", "path": "", "dataverse_server": "",
                                                      "dataverse_doi": "", "isic2018_url": "", "cache_dir": ""},
                     "download")
    with pytest.raises(PipelineError, match="download.path is empty"):
        download_source(group("download", **PARAMS, path=""), tmp_path / "raw", tmp_path)
    with pytest.raises(PipelineError, match="does not exist"):
        download(tmp_path / "nowhere", tmp_path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none of them."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_implausibly_large_image_is_refused_without_decoding_it(synthetic_folder, tmp_path):
    source = copy_of(synthetic_folder, tmp_path)
    victim = sorted((source / "HAM10000_images_part_1").iterdir())[0]
    victim.write_bytes(_png_header_only(40000, 40000))  # 1.6 gigapixels, a few dozen bytes
    with pytest.raises(PipelineError, match=f"{victim.name} is implausibly large"):
        download(source, tmp_path)
    assert not (tmp_path / "raw").exists()


def test_semicolon_separated_metadata_is_named_as_such(synthetic_folder, tmp_path):
    source = copy_of(synthetic_folder, tmp_path)
    path = source / "HAM10000_metadata.csv"
    pd.read_csv(path).to_csv(path, sep=";", index=False)
    with pytest.raises(PipelineError, match="HAM10000_metadata.csv: looks ';'-separated .* save it as comma-separated"):
        download(source, tmp_path)


def test_an_image_under_another_extension_is_named_with_it(synthetic_folder, tmp_path):
    from PIL import Image

    source = copy_of(synthetic_folder, tmp_path)
    victim = sorted((source / "HAM10000_images_part_1").iterdir())[0]
    Image.open(victim).save(victim.with_suffix(".png"))
    victim.unlink()
    with pytest.raises(PipelineError, match=rf"missing: {victim.stem}; 1 of them are there under another extension "
                                            rf"\(source/HAM10000_images_part_1/{victim.stem}.png\).*convert"):
        download(source, tmp_path)


def test_links_in_a_local_source_are_followed_and_a_loop_ends(synthetic_folder, tmp_path):
    source = copy_of(synthetic_folder, tmp_path)
    shutil.move(source / "HAM10000_images_part_2", tmp_path / "elsewhere")
    (source / "HAM10000_images_part_2").symlink_to(tmp_path / "elsewhere")
    (source / "loop").symlink_to(source)
    record = download(source, tmp_path)
    assert record["images"] == len(pd.read_csv(source / "HAM10000_metadata.csv"))


def test_a_broken_link_to_an_image_is_named(synthetic_folder, tmp_path):
    source = copy_of(synthetic_folder, tmp_path)
    victim = sorted((source / "HAM10000_images_part_1").iterdir())[0]
    victim.unlink()
    victim.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(PipelineError, match=f"{victim.name} cannot be read: no such file \\(a broken link"):
        download(source, tmp_path)
