"""Every registered plug-in, tested by being registered: each discriminator (through
`softpatch_<name>` and SoftPatch+'s fusion of all of them), each method name and each dataset layout.
A new discriminator module, method or layout is exercised here with no new test.

Methods: one plain run (`driver.run`) of every method on a tiny demo tree with planted noise, twice:
fit, predict, metrics in [0, 1], and the same numbers both times. Layouts: each of `data.LAYOUTS`
lists, reads and loads the miniature tree its module declares (`Layout.miniature`). Random-init
backbone: the numbers say nothing about the methods, only that each one runs end to end.
"""

import os

import numpy as np
import pytest
from fake_trees import layout_tree

from configs import demo as demo_config
from softpatch_jax import data, discriminators, methods
from softpatch_jax.data import demo
from softpatch_jax.experiment import driver
from tests.conftest import dataset_options

TINY = demo.DemoSpec(size=32, num_train=8, num_test_good=3, num_per_defect=1, categories=("pill",))


def _config(root):
    c = demo_config.get_config()
    c.dataset.layout = "mvtec"
    c.dataset.root = root
    c.dataset.resize = c.dataset.crop = 32
    c.dataset.batch_size = 8
    c.backbone.arch = "resnet_tiny"
    c.backbone.allow_random_init = True
    c.embedding.pretrain_dim = c.embedding.target_dim = 32
    c.softpatch.projection_dim = 8
    c.softpatch.lof_k = 3
    c.softpatch.discriminators = ",".join(discriminators.NAMES)  # SoftPatch+ fuses all of them
    c.coreset.ratio = 0.25
    c.coreset.num_starts = 4
    c.noise.ratios = "0.0,0.25"
    c.noise.overlap = True
    c.methods = ",".join(methods.names())
    c.eval.metrics = "image_auroc,pixel_auroc"
    c.eval.save_maps = 0
    return c


@pytest.mark.slow
def test_every_registered_method_fits_predicts_and_evaluates_deterministically(tmp_path):
    root = demo.write(str(tmp_path / "tiny"), TINY)
    runs = [driver.run(_config(root), str(tmp_path / f"run{i}")) for i in range(2)]
    rows = runs[0]
    assert {r["method"] for r in rows} == set(methods.names())
    assert len(rows) == len(methods.names()) * 2  # x noise ratios
    for r in rows:
        for m in ("image_auroc", "pixel_auroc"):
            assert np.isfinite(r[m]) and 0.0 <= r[m] <= 1.0, (r["method"], m, r[m])
        assert r["bank_cls"] > 0 and r["bank_seg"] > 0
    again = {(r["method"], r["noise_ratio"]): r for r in runs[1]}
    for r in rows:
        other = again[r["method"], r["noise_ratio"]]
        for m in ("image_auroc", "pixel_auroc", "bank_cls", "bank_seg"):
            assert r[m] == other[m], (r["method"], m)


@pytest.mark.parametrize("layout", sorted(data.LAYOUTS))
def test_every_registered_layout_lists_reads_and_loads(layout, tmp_path):
    root, extra = layout_tree(layout, str(tmp_path / layout), np.random.default_rng(0))
    opts = dataset_options(layout=layout, root=root, resize=16, crop=12, **extra)
    cats = data.categories(opts)
    assert cats
    splits = data.read(opts, cats[0])
    assert splits.train and splits.test
    assert {r.label for r in splits.test} == {0, 1}  # normal and anomalous test images
    images, masks = data.loader(opts, cats[0])(splits.test)
    assert images.shape == (len(splits.test), 12, 12, 3) and images.dtype == np.uint8
    assert masks.shape == (len(splits.test), 12, 12) and masks.dtype == bool


def test_readme_method_table_is_the_registry():
    """README's method table has a row per registered method (a generated family, e.g.
    `softpatch_<discriminator>`, one row) whose text is the method's registered summary."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    start = readme.index("| method | what it is |")
    rows = {}
    for line in readme[start:].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        name, text = (cell.strip() for cell in line.split("|")[1:3])
        rows[name.strip("`")] = text
    for name, method in methods.REGISTRY.items():
        row = method.family or name
        assert row in rows, f"README's method table lacks {row!r}"
        assert rows[row] == method.summary, row
    families = {m.family or n for n, m in methods.REGISTRY.items()}
    assert set(rows) == families, f"rows for no registered method: {set(rows) - families}"


def test_a_registration_is_all_a_layout_or_method_needs(tmp_path, monkeypatch):
    """A layout or method registered at run time is at once a valid config value, and a layout is
    guessed from its folder in the errors of a wrong one: nothing else lists the names."""
    from configs import demo as demo_config
    from softpatch_jax.data import registry, validate
    from softpatch_jax.experiment import config_errors

    root, _ = layout_tree("mvtec", str(tmp_path / "toy"), np.random.default_rng(0))
    marked = tmp_path / "marked"  # a folder only the toy layout claims (the tests are disjoint)
    marked.mkdir()
    (marked / "toy.txt").write_text("")
    toy = registry.Layout(
        name="toy",
        list_categories=data.LAYOUTS["mvtec"].list_categories,
        read_category=data.LAYOUTS["mvtec"].read_category,
        expected="ROOT/toy.txt beside MVTec's folders",
        miniature=data.LAYOUTS["mvtec"].miniature,
        looks_like=lambda r: os.path.isfile(os.path.join(r, "toy.txt")),
    )
    c = demo_config.get_config()
    c.dataset.layout = "toy"
    c.methods = "patchcore,toy_method"
    with pytest.raises(config_errors.ConfigError, match="unknown method 'toy_method'"):
        config_errors.validate(c)
    monkeypatch.setitem(
        methods.REGISTRY,
        "toy_method",
        methods.Method("toy_method", methods.REGISTRY["patchcore"].build, "a toy"),
    )
    with pytest.raises(config_errors.ConfigError, match="unknown dataset layout 'toy'"):
        config_errors.validate(c)
    monkeypatch.setitem(registry.LAYOUTS, "toy", toy)
    config_errors.validate(c)  # both names valid now
    assert validate.guess_layout(str(marked)) == "toy"
    assert validate.guess_layout(root) == "mvtec"
    opts = dataset_options(layout="toy", root=root, resize=16, crop=12)
    assert data.categories(opts) == ["gizmo", "widget"]
    assert "toy_method" in methods.names()
