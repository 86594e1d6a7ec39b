"""Folder listing and strict decoding for the deployment tool: formats and modes against hand-made
pixel values, and every kind of bad input named in the error."""

import os

import numpy as np
import pytest
from PIL import Image

from softpatch_jax.data import folder, images


def _rgb(seed=0, size=40):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_listing_walks_nested_folders_ignores_and_lists_non_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ("x.png", "a/y.JPG", "a/b/z.webp", ".hidden/h.png", ".DS_Store"):
        Image.fromarray(_rgb()).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "labels.csv").write_text("x,y\n")
    listing = folder.list_images(str(tmp_path))
    assert [listing.relative(r.path) for r in listing.records] == ["a/b/z.webp", "a/y.JPG", "x.png"]
    assert all(r.label == folder.UNKNOWN for r in listing.records)
    assert [os.path.basename(p) for p in listing.ignored] == ["labels.csv", "notes.txt"]


def test_empty_folder_and_folder_without_images_are_errors_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images found.*" + tmp_path.name):
        folder.list_images(str(tmp_path))
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"readme\.md"):
        folder.list_images(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder.list_images(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"readme\.md.*not an image"):
        folder.list_images([str(tmp_path / "readme.md")])


def test_modes_convert_by_the_documented_rules(tmp_path):
    rgb = _rgb(1)
    gray = rgb[..., 0]
    cases = {}
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    cases["rgb.bmp"] = rgb
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    cases["rgb.tif"] = rgb
    Image.fromarray(rgb).save(tmp_path / "rgb.webp", lossless=True)
    cases["rgb.webp"] = rgb
    Image.fromarray(gray).save(tmp_path / "gray.png")
    cases["gray.png"] = np.repeat(gray[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((40, 40, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    cases["rgba.png"] = rgb  # alpha dropped, colours kept
    g16 = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g16).save(tmp_path / "g16.tif")
    want16 = np.clip(np.rint(g16 * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    cases["g16.png"] = cases["g16.tif"] = np.repeat(want16[..., None], 3, axis=2)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255]], np.uint8)
    idx = np.random.default_rng(2).integers(0, 3, (40, 40)).astype(np.uint8)
    pimg = Image.fromarray(idx, mode="P")
    pimg.putpalette(palette.ravel().tolist())
    pimg.save(tmp_path / "pal.png")
    cases["pal.png"] = palette[idx]
    for name, want in cases.items():
        got = images.decode(str(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (40, 40, 3), name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # JPEG is lossy: only shape and closeness.
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(tmp_path / "flat.jpg", quality=95)
    assert np.abs(images.decode(str(tmp_path / "flat.jpg")).astype(int) - 120).max() <= 2


def test_truncated_and_non_image_bytes_are_named(tmp_path):
    Image.fromarray(_rgb(size=64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.jpg").write_bytes(b"this is text, not a jpeg")
    for name in ("cut.png", "fake.jpg"):
        with pytest.raises(images.BadImageError, match=name) as err:
            images.load(str(tmp_path / name), 32, 32)
        assert err.value.path.endswith(name)


def test_small_image_is_refused_with_the_size_needed_unless_upscaling_is_allowed(tmp_path):
    Image.fromarray(_rgb(size=20)[:, :15]).save(tmp_path / "small.png")
    with pytest.raises(images.BadImageError, match=r"small.png.*15x20.*at least 32"):
        images.load(str(tmp_path / "small.png"), 36, 32)
    assert images.load(str(tmp_path / "small.png"), 36, 32, allow_upscale=True).shape == (32, 32, 3)


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.zeros((40, 40), np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(images.BadImageError, match=r"f\.tif.*floating-point"):
        images.decode(str(tmp_path / "f.tif"))


def test_batches_skip_and_list_bad_files_only_when_asked(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(_rgb(i)).save(p)
        paths.append(str(p))
    (tmp_path / "2.png").write_bytes(b"broken")
    with pytest.raises(images.BadImageError, match=r"2.png.*--skip_bad_images"):
        list(images.iter_batches(paths, 2, 32, 32, skip_bad=False))
    batches = list(images.iter_batches(paths, 2, 32, 32, skip_bad=True))
    assert np.concatenate([b.index for b in batches]).tolist() == [0, 1, 3, 4]
    assert [b.path for bt in batches for b in bt.bad] == [paths[2]]
    np.testing.assert_array_equal(
        batches[2].images[0], images.load(paths[4], 32, 32)
    )  # order and content survive the prefetching
