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
- Symbolic links are followed, but every real folder and every real file is visited once: a folder
  reached again and a file reached again (a link to an image already listed) are skipped and
  reported in `skipped` with the reason: a "symlink loop" when the folder holds the link (`sub/up
  -> ..`), a "second link" to a folder already listed otherwise; so are
  broken links and entries that are not regular files (a FIFO named x.png would block the reader).
- Names are whatever bytes the file system holds. Inside Python they are str with undecodable bytes
  as surrogates (os.fsdecode); every name the tool writes to CSV/JSON goes through `escape`:
  a backslash becomes two, control characters and bytes that are not UTF-8 become \\xNN, so any
  name can be written and `unescape` gives back the original (os.fsencode of it: the bytes).
"""

from __future__ import annotations

import dataclasses
import os
import re
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
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why): loops, repeats, broken links

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def escape(name: str) -> str:
    """A file name (str from os.fsdecode) as printable UTF-8 text; `unescape` inverts it."""
    out = []
    for ch in name:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, as surrogateescape carries it
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return "".join(out)


_ESCAPED = re.compile(r"\\\\|\\x([0-9a-f]{2})")


def unescape(text: str) -> str:
    """The inverse of `escape`: the name as os.fsdecode gives it (os.fsencode -> original bytes)."""

    def one(m: re.Match) -> str:
        if m.group(1) is None:
            return "\\"
        v = int(m.group(1), 16)
        return chr(0xDC00 + v) if v >= 0x80 else chr(v)

    return _ESCAPED.sub(one, text)


def _walk(folder: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    images, ignored, skipped = [], [], []
    seen_dirs: dict[tuple[int, int], str] = {}
    stack: list[tuple[str, frozenset]] = [(folder, frozenset())]  # (folder, its ancestors' ids)
    while stack:
        d, ancestors = stack.pop()
        try:
            key = _key(d)
            first = _seen_before(d, seen_dirs)
            if first is not None:
                why = (
                    f"symlink loop: leads back to {first!r}, which holds it"
                    if key in ancestors
                    else f"second link to the folder already listed as {first!r} (its images are "
                    "listed once)"
                )
                skipped.append((d, why))
                continue
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            raise PermissionError(f"cannot list folder {d!r}: {err.strerror}") from err
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():  # follows links
                    subdirs.append(e.path)
                elif e.is_file():
                    (images if is_image_name(e.name) else ignored).append(e.path)
                elif e.is_symlink():
                    skipped.append((e.path, "broken symbolic link"))
                else:
                    skipped.append((e.path, "not a regular file"))
            except OSError as err:
                skipped.append((e.path, f"cannot stat: {err.strerror}"))
        inner = ancestors | {key}
        stack += [(s, inner) for s in reversed(subdirs)]
    return images, ignored, skipped


def _once(paths: list[str], skipped: list[tuple[str, str]]) -> list[str]:
    """Sorted paths with every real file kept once (the first path in sorted order)."""
    seen: dict[tuple[int, int], str] = {}
    out = []
    for p in sorted(set(paths)):
        first = _seen_before(p, seen)
        if first is not None:
            skipped.append((p, f"same file as {first!r}"))
            continue
        out.append(p)
    return out


def _key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _seen_before(path: str, seen: dict[tuple[int, int], str]) -> str | None:
    """The path under which `path`'s real file or folder (device, inode) was seen first, or None
    (then `path` is recorded as that first one). Raises OSError when it cannot be stat'ed."""
    key = _key(path)
    if key in seen:
        return seen[key]
    seen[key] = path
    return None


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
    skipped: list[tuple[str, str]] = []
    for src in sources:
        if os.path.isdir(src):
            found, passed, odd = _walk(src)
            images += found
            ignored += passed
            skipped += odd
        elif os.path.isfile(src):
            if not is_image_name(src):
                raise ValueError(
                    f"{src!r} is not an image file by its extension; accepted: "
                    + " ".join(IMAGE_EXTENSIONS)
                )
            images.append(src)
        else:
            raise FileNotFoundError(f"image source {src!r} does not exist")
    skipped = [(os.path.abspath(p), why) for p, why in skipped]
    images = _once([os.path.abspath(p) for p in images], skipped)
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
    return Listing(records, tuple(ignored), root, tuple(skipped))
