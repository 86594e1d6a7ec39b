"""Weight sources, the orbax cache and resolve()'s order, against torch-written files."""

import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from safetensors.numpy import save_file  # noqa: E402

from configs import base  # noqa: E402
from softpatch_jax import weights  # noqa: E402
from softpatch_jax.experiment import options  # noqa: E402
from softpatch_jax.models import resnet  # noqa: E402

TV_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def _resnet18_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """resnet18 state dicts (seeds 0 and 1) as .pth, and seed 0 also as .safetensors."""
    root = tmp_path_factory.mktemp("files")
    state = _resnet18_state(0)
    torch.save(state, root / "r18.pth")
    save_file({k: v.numpy() for k, v in state.items()}, str(root / "r18.safetensors"))
    torch.save(_resnet18_state(1), root / "r18_other.pth")
    return root


def _cfg(cache_dir, **overrides):
    cfg = base.get_config().backbone
    cfg.arch = "resnet18"
    cfg.cache_dir = str(cache_dir)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return options.backbone_options(cfg)


def _assert_trees_equal(a: dict, b: dict) -> None:
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert flat_a.keys() == flat_b.keys()
    for path, leaf in flat_a.items():
        assert np.asarray(leaf).dtype == np.asarray(flat_b[path]).dtype, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=str(path))


def test_pth_and_safetensors_convert_identically(files):
    from_pth = weights.convert("resnet18", weights.read_state_dict(files / "r18.pth"))
    from_st = weights.convert("resnet18", weights.read_state_dict(files / "r18.safetensors"))
    _assert_trees_equal(from_pth, from_st)
    # Spot-check against torch's own layout change (OIHW -> HWIO) and BN names.
    state = _resnet18_state(0)
    kernel = from_pth["params"]["layer3_0"]["downsample_conv"]["kernel"]
    np.testing.assert_array_equal(kernel, state["layer3.0.downsample.0.weight"].permute(2, 3, 1, 0))
    var = from_pth["batch_stats"]["layer2_1"]["bn2"]["var"]
    np.testing.assert_array_equal(var, state["layer2.1.bn2.running_var"].numpy())
    assert weights.variables_sha256(from_pth) == weights.variables_sha256(from_st)


def test_cache_round_trip_is_lossless_and_atomic(files, tmp_path):
    variables = weights.convert("resnet18", weights.read_state_dict(files / "r18.pth"))
    info = {"arch": "resnet18", "weights": "test", "sha256": weights.variables_sha256(variables)}
    entry = weights.save_cache(variables, str(tmp_path / "cache" / "resnet18"), info)
    loaded, loaded_info = weights.load_cache(entry)
    _assert_trees_equal(variables, loaded)
    assert loaded_info == info
    assert weights.variables_sha256(loaded) == info["sha256"]
    assert os.listdir(tmp_path / "cache") == ["resnet18"]  # no temporary directory left behind
    # Re-saving replaces the entry whole.
    other = weights.convert("resnet18", weights.read_state_dict(files / "r18_other.pth"))
    weights.save_cache(other, entry, {**info, "weights": "other"})
    reloaded, reloaded_info = weights.load_cache(entry)
    _assert_trees_equal(other, reloaded)
    assert reloaded_info["weights"] == "other"


def test_resolve_order_and_offline_error(files, tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    tried = []

    def offline(url, dest, timeout_s=weights.DOWNLOAD_TIMEOUT_S):
        tried.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(weights, "download", offline)
    with pytest.raises(FileNotFoundError) as error:
        weights.resolve(_cfg(root))
    message = str(error.value)
    assert tried == list(weights.DOWNLOADS["resnet18"])  # safetensors first, then torchvision
    assert TV_URL in message and "resnet18.tv_in1k" in message
    assert (
        f"python -m softpatch_jax.weights convert --source=resnet18-f37072fd.pth "
        f"--arch=resnet18 --cache_dir={root}" in message
    )

    with caplog.at_level(logging.WARNING):
        random_vars, info = weights.resolve(_cfg(root, allow_random_init=True))
    assert info["weights"] == "random-init" and "RANDOM weights" in caplog.text
    assert not os.path.exists(root / "resnet18")  # random init is never cached

    want = weights.convert("resnet18", weights.read_state_dict(files / "r18.pth"))
    # Random init covers the default feature stages (through layer3) with torchvision's shapes.
    flat_random = dict(jax.tree_util.tree_flatten_with_path(random_vars)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert any("layer3_1" in jax.tree_util.keystr(p) for p in flat_random)
    assert not any("layer4" in jax.tree_util.keystr(p) for p in flat_random)
    for path, leaf in flat_random.items():
        assert leaf.shape == flat_want[path].shape and leaf.dtype == np.float32, path
    # The arch module's optional hook comes before any download.
    monkeypatch.setattr(
        resnet, "find_local_weights", lambda arch: str(files / "r18.pth"), raising=False
    )
    got, info = weights.resolve(_cfg(root))
    assert info["weights"] == f"local:{files / 'r18.pth'}"
    assert info["sha256"] == weights.variables_sha256(want) != weights.variables_sha256(random_vars)
    _assert_trees_equal(got, want)

    # Now cached: found before the hook is asked.
    monkeypatch.setattr(resnet, "find_local_weights", lambda arch: pytest.fail("hook asked"))
    got, info = weights.resolve(_cfg(root))
    assert info["weights"].startswith(f"cache:{root / 'resnet18'}")
    _assert_trees_equal(got, want)

    # An explicit file beats the cache.
    got, info = weights.resolve(_cfg(root, weights=str(files / "r18_other.pth")))
    assert info["weights"] == f"file:{files / 'r18_other.pth'}"
    _assert_trees_equal(got, weights.convert("resnet18", _state_np(_resnet18_state(1))))


def _state_np(state) -> dict:
    return {k: v.numpy() for k, v in state.items()}


def test_resolve_downloads_converts_and_caches(files, tmp_path, monkeypatch):
    root = tmp_path / "cache"

    def hub_only(url, dest, timeout_s=weights.DOWNLOAD_TIMEOUT_S):
        if "huggingface.co" not in url:
            raise OSError("unexpected second download")
        shutil.copy(files / "r18.safetensors", dest)
        return dest

    monkeypatch.setattr(weights, "download", hub_only)
    got, info = weights.resolve(_cfg(root))
    assert info["weights"] == f"download:{weights.DOWNLOADS['resnet18'][0]}"
    _assert_trees_equal(got, weights.convert("resnet18", _state_np(_resnet18_state(0))))
    _assert_trees_equal(weights.load_cache(str(root / "resnet18"))[0], got)

    # A torchvision file whose sha256 does not match its name's prefix is refused.
    def tampered(url, dest, timeout_s=weights.DOWNLOAD_TIMEOUT_S):
        if "huggingface.co" in url:
            raise OSError("hub down")
        shutil.copy(files / "r18.pth", dest)
        return dest

    monkeypatch.setattr(weights, "download", tampered)
    with pytest.raises(FileNotFoundError, match="does not match"):
        weights.resolve(_cfg(tmp_path / "other_cache"))


def test_convert_cli_writes_the_cache(files, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "softpatch_jax.weights",
        "convert",
        f"--source={files / 'r18.pth'}",
        "--arch=resnet18",
        f"--cache_dir={tmp_path}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {tmp_path / 'resnet18'}" in proc.stdout
    loaded, info = weights.load_cache(str(tmp_path / "resnet18"))
    _assert_trees_equal(loaded, weights.convert("resnet18", _state_np(_resnet18_state(0))))
    assert info["sha256"] == weights.variables_sha256(loaded)


def test_config_typos_fail_early(tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        weights.resolve(_cfg(tmp_path, dtype="bf16"))
    with pytest.raises(ValueError, match="unknown backbone arch"):
        weights.resolve(_cfg(tmp_path, arch="wide_resnet50"))
