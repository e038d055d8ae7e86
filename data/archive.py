"""Reading image archives: streamed tar members, JPEG decoding, and the error both raise."""
from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class DatasetError(RuntimeError):
    """A dataset file exists but its content is not what the loader expects."""


def iter_tar_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (member name without a leading './', bytes) for each regular file of a tar.

    Streaming mode ('r|*') reads the compressed file once from front to back; random access into
    an .xz would decompress it again for every seek.

    Raises:
        DatasetError naming `path` when the archive is truncated or corrupt.
    """
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if member.isfile():
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    yield name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as err:
        raise DatasetError(
            f"{path}: cannot read the archive; it looks truncated or corrupt "
            f"({type(err).__name__}: {err}). Expected a complete tar (optionally .xz/.gz); "
            f"copy the file again.") from err


def decode_rgb(blob: bytes, source: str, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to an H x W x 3 uint8 array (grayscale and CMYK become RGB).

    Args:
        blob: the encoded file.
        source: where it came from, for error messages ("archive.tar.xz:train/cat/0001.jpg").
        expected_hw: required (height, width), or None to accept any size.
    """
    try:
        with Image.open(io.BytesIO(blob)) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DatasetError(f"{source}: cannot decode the image ({err})") from err
    if expected_hw is not None and pixels.shape[:2] != tuple(expected_hw):
        raise DatasetError(f"{source}: image is {pixels.shape[0]}x{pixels.shape[1]}, "
                           f"expected {expected_hw[0]}x{expected_hw[1]}")
    return pixels
