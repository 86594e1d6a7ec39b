"""Plain image folders, for the deployment tool: every image under a folder (any nesting) or an
explicit list of files becomes a record with an unknown label, and nothing is decoded here.

Rules (what `list_images` accepts and reports):
- Image files are recognised by extension: .png .jpg .jpeg .bmp .tif .tiff .webp (any case).
- Any other file is not an error: it is skipped and returned in `ignored`, so that a stray
  README, CSV or thumbnail database in a production folder does not stop a run but is still
  reported. Hidden files and folders (names starting with ".") are skipped silently, as they are
  file-system bookkeeping (.DS_Store, .ipynb_checkpoints, our own temp files).
- An explicitly listed file must exist and carry an image extension (the user named it, so a
  mistake there is an error, not a skip).
- Order is sorted by path, so runs are reproducible whatever the file system's listing order.
- No image at all is an error naming the folder and saying what was ignored there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from softpatch_jax.data.records import Record

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
UNKNOWN = -1  # the label of an unlabelled image


@dataclasses.dataclass(frozen=True)
class Listing:
    """The images found and the files passed over.

    Attributes:
      records: one record per image, label UNKNOWN, sorted by path.
      ignored: files that are not images by extension (full paths, sorted).
      root: the common folder of the images; output names are relative to it.
    """

    records: tuple[Record, ...]
    ignored: tuple[str, ...]
    root: str

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(folder: str) -> tuple[list[str], list[str]]:
    images, ignored = [], []

    def onerror(err: OSError) -> None:
        raise PermissionError(f"cannot list folder {err.filename!r}: {err.strerror}") from err

    for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            (images if is_image_name(name) else ignored).append(path)
    return images, ignored


def list_images(sources: str | Sequence[str]) -> Listing:
    """Images under one folder, or under a mix of folders and files given explicitly.

    Raises:
      FileNotFoundError: a source does not exist, or no image was found (message names the
        sources and the ignored files).
      ValueError: an explicitly listed file is not an image by extension.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise FileNotFoundError("no images given: pass a folder or a list of image files")
    images: list[str] = []
    ignored: list[str] = []
    for src in sources:
        if os.path.isdir(src):
            found, skipped = _walk(src)
            images += found
            ignored += skipped
        elif os.path.isfile(src):
            if not is_image_name(src):
                raise ValueError(
                    f"{src!r} is not an image file by its extension; accepted: "
                    + " ".join(IMAGE_EXTENSIONS)
                )
            images.append(src)
        else:
            raise FileNotFoundError(f"image source {src!r} does not exist")
    images = sorted({os.path.abspath(p) for p in images})
    ignored = sorted({os.path.abspath(p) for p in ignored})
    if not images:
        what = f"; ignored {len(ignored)} non-image file(s): {ignored[:5]}" if ignored else ""
        raise FileNotFoundError(
            f"no images found in {list(sources)} (accepted extensions: "
            + " ".join(IMAGE_EXTENSIONS)
            + f"){what}"
        )
    # The deepest folder holding every image (commonpath of a single file is the file itself).
    root = os.path.dirname(images[0]) if len(images) == 1 else os.path.commonpath(images)
    records = tuple(Record(p, UNKNOWN, "unknown") for p in images)
    return Listing(records, tuple(ignored), root)
