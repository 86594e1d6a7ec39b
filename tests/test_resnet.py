"""Flax ResNet + convert_torchvision vs torchvision in eval mode (the oracle).

Each model gets seeded random weights with non-trivial batch norm: random affine parameters and
running statistics measured on random images (so activations stay O(1), as with trained weights).
The state dict goes through torch.save -> torch_pickle -> convert_torchvision, the same path real
weights take.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from softpatch_jax.models import resnet, torch_pickle  # noqa: E402


def _randomise_batch_norm(model, images_Bx3xHxW) -> None:
    """Random BN affine params, then running stats measured in train mode (cumulative average)."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.reset_running_stats()
                bn.momentum = None
        model.train()
        model(images_Bx3xHxW)
    model.eval()


def _torchvision_tiny(width_per_group: int):
    """torchvision's ResNet/Bottleneck code with 8 base planes and one block per stage.

    torchvision hard-codes 64 base planes in ResNet.__init__, so the stem and stages are rebuilt
    with its own `_make_layer` (which reads `inplanes`), matching `resnet.resnet_tiny`.
    """
    from torchvision.models.resnet import Bottleneck, ResNet

    model = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=width_per_group)
    model.inplanes = 8
    model.conv1 = torch.nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(8)
    model.layer1 = model._make_layer(Bottleneck, 8, 1)
    model.layer2 = model._make_layer(Bottleneck, 16, 1, stride=2)
    model.layer3 = model._make_layer(Bottleneck, 32, 1, stride=2)
    model.layer4 = model._make_layer(Bottleneck, 64, 1, stride=2)
    model.fc = torch.nn.Linear(64 * 4, 10)
    return model


def _torchvision_stages(model, images_Bx3xHxW, dtype=torch.float32) -> dict:
    """torchvision's layer1..layer4 outputs as NHWC float64 numpy."""
    outputs = {}
    with torch.no_grad():
        x = images_Bx3xHxW.to(dtype)
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for stage in resnet.STAGES:
            x = getattr(model, stage)(x)
            outputs[stage] = x.permute(0, 2, 3, 1).double().numpy()
    return outputs


def _prepared(model, size: int, tmp_path, num_images: int = 2, seed: int = 0):
    """Seeded weights and images; the state dict as our reader sees it after torch.save."""
    torch.manual_seed(seed)
    _randomise_batch_norm(model, torch.randn(2, 3, size, size))
    images = torch.randn(num_images, 3, size, size)
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    return images, torch_pickle.load_state_dict(path)


def _max_errors(module, variables, images_Bx3xHxW, want: dict, dtype=jnp.float32) -> dict:
    images_BxHxWx3 = jnp.asarray(images_Bx3xHxW.permute(0, 2, 3, 1).double().numpy(), dtype)
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    got = jax.jit(module.apply)(variables, images_BxHxWx3)
    assert set(got) == set(want)
    return {k: float(np.abs(np.asarray(got[k], np.float64) - want[k]).max()) for k in want}


@pytest.mark.parametrize("width_per_group", [64, 128])
def test_tiny_matches_torchvision(tmp_path, width_per_group):
    model = _torchvision_tiny(width_per_group)
    images, state = _prepared(model, 64, tmp_path)
    # arch=None: block type, widths and depths are inferred from the arrays.
    variables = resnet.convert_torchvision(state, ignore_prefixes=("fc.",))
    module = resnet.resnet_tiny(out_layers=resnet.STAGES, width_per_group=width_per_group)
    with jax.numpy_rank_promotion("raise"):
        errors = _max_errors(module, variables, images, _torchvision_stages(model, images))
    assert max(errors.values()) < 1e-4, errors


def test_resnet18_matches_torchvision(tmp_path):
    model = torchvision.models.resnet18()
    images, state = _prepared(model, 64, tmp_path)
    variables = resnet.convert_torchvision(state, "resnet18", ignore_prefixes=("fc.",))
    module = resnet.resnet18(out_layers=resnet.STAGES)
    errors = _max_errors(module, variables, images, _torchvision_stages(model, images))
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.slow
def test_wide_resnet50_2_matches_torchvision_at_224(tmp_path):
    model = torchvision.models.wide_resnet50_2()
    images, state = _prepared(model, 224, tmp_path, num_images=1)
    variables = resnet.convert_torchvision(state, "wide_resnet50_2", ignore_prefixes=("fc.",))
    want64 = _torchvision_stages(model.double(), images, torch.float64)
    want32 = _torchvision_stages(model.float(), images, torch.float32)
    # float64 on both sides isolates the architecture and the conversion from rounding.
    with jax.enable_x64(True):
        module64 = resnet.wide_resnet50_2(out_layers=resnet.STAGES, dtype=jnp.float64)
        errors64 = _max_errors(module64, variables, images, want64, jnp.float64)
    assert max(errors64.values()) < 1e-9, errors64
    module = resnet.wide_resnet50_2(out_layers=resnet.STAGES)
    errors32 = _max_errors(module, variables, images, want32)
    assert errors32["layer1"] < 1e-4 and errors32["layer2"] < 1e-4, errors32
    # Deeper stages accumulate float32 rounding in both libraries (values reach ~15): torchvision's
    # own float32 layer3 is ~3.6e-4 from the exact (float64) value, so no float32 implementation
    # can promise 1e-4 against it. Hold ours to 1e-4 of the activation range, to the size of
    # torchvision's own float32 error, and check ours is as close to the exact value as it is.
    ours_vs_exact = _max_errors(module, variables, images, want64)
    for stage in ("layer3", "layer4"):
        scale = np.abs(want64[stage]).max()
        torch_own = np.abs(want32[stage] - want64[stage]).max()
        print(
            f"{stage}: ours vs torchvision f32 {errors32[stage]:.1e}; vs exact: ours "
            f"{ours_vs_exact[stage]:.1e}, torchvision {torch_own:.1e}; max |value| {scale:.1f}"
        )
        assert ours_vs_exact[stage] < 2 * torch_own, (stage, ours_vs_exact, torch_own)
        assert errors32[stage] < 1e-4 * scale, (stage, errors32, scale)
        assert errors32[stage] < 3 * torch_own, (stage, errors32, torch_own)


def _flax_to_torchvision_names(variables: dict) -> dict:
    """The reverse mapping, written independently of the converter, for the round-trip check."""
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    stat_names = {"mean": "running_mean", "var": "running_var"}
    out = {}
    for collection, names in (("params", leaf_names), ("batch_stats", stat_names)):
        flat = jax.tree_util.tree_flatten_with_path(variables[collection])[0]
        for key_path, leaf in flat:
            parts = [k.key for k in key_path]
            module_parts = []
            for part in parts[:-1]:
                part = part.replace("downsample_conv", "downsample.0")
                part = part.replace("downsample_bn", "downsample.1")
                if part.startswith("layer"):
                    part = part.replace("_", ".", 1)
                module_parts.append(part)
            array = np.asarray(leaf)
            if parts[-1] == "kernel":
                array = array.transpose(3, 2, 0, 1)
            out[".".join([*module_parts, names[parts[-1]]])] = array
    return out


def test_reverse_mapping_loads_into_torchvision(tmp_path):
    model = torchvision.models.resnet18()
    _, state = _prepared(model, 64, tmp_path)
    back = _flax_to_torchvision_names(resnet.convert_torchvision(state, ignore_prefixes=("fc.",)))
    fresh = torchvision.models.resnet18()
    result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=False)
    assert not result.unexpected_keys
    assert all(
        k.startswith("fc.") or k.endswith("num_batches_tracked") for k in result.missing_keys
    )
    for name, array in back.items():
        np.testing.assert_array_equal(array, model.state_dict()[name].numpy(), err_msg=name)


def test_missing_unexpected_and_wrong_shape_keys_are_named():
    state = {
        k: v.numpy()
        for k, v in torchvision.models.resnet18().state_dict().items()
        if k != "fc.bias"
    }
    with pytest.raises(ValueError, match=r"unexpected keys \['fc.weight'\]"):
        resnet.convert_torchvision(state, "resnet18")
    del state["layer2.0.bn1.running_var"]
    state["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"layer2\.0\.bn1\.running_var") as info:
        resnet.convert_torchvision(state, "resnet18", ignore_prefixes=("fc.",))
    assert "layer9.0.conv1.weight" in str(info.value)
    # strict=False drops what has no counterpart, but a missing array is still an error.
    with pytest.raises(ValueError, match=r"missing keys \['layer2\.0\.bn1\.running_var'\]"):
        resnet.convert_torchvision(state, "resnet18", strict=False)
    state["layer2.0.bn1.running_var"] = np.ones(64, np.float32)  # resnet18 wants 128 here
    with pytest.raises(ValueError, match=r"layer2.0.bn1.running_var: \(64,\)"):
        resnet.convert_torchvision(state, "resnet18", strict=False)


def test_nothing_past_the_last_requested_stage():
    module = resnet.resnet_tiny(out_layers=("layer2", "layer3"))
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    # Shapes only (eval_shape): Flax's initialisers take long to compile and are beside the point.
    variables = jax.eval_shape(module.init, jax.random.key(0), images)
    blocks = set(variables["params"]) | set(variables["batch_stats"])
    assert not any(name.startswith("layer4") for name in blocks)
    assert any(name.startswith("layer3") for name in blocks)
    out = jax.eval_shape(module.apply, variables, images)
    assert sorted(out) == ["layer2", "layer3"]
    assert out["layer3"].shape == (1, 2, 2, 128)
    # The traced computation holds exactly the convolutions torchvision has up to layer3.
    tv = _torchvision_tiny(64)
    tv_convs = sum(
        isinstance(m, torch.nn.Conv2d)
        for part in (tv.conv1, tv.layer1, tv.layer2, tv.layer3)
        for m in part.modules()
    )
    jaxpr = jax.make_jaxpr(module.apply)(variables, images)
    ours = str(jaxpr).count("conv_general_dilated[")
    assert ours == tv_convs == 13

    state = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
    trimmed = resnet.convert_torchvision(state, "resnet18", out_layers=("layer2",), strict=False)
    assert not any(name.startswith(("layer3", "layer4")) for name in trimmed["params"])
    with pytest.raises(ValueError, match=r"layer3\.0\.conv1\.weight"):
        resnet.convert_torchvision(
            state, "resnet18", out_layers=("layer2",), ignore_prefixes=("fc.",)
        )


def test_bfloat16_compute_keeps_float32_params_and_tracks_torchvision(tmp_path):
    model = _torchvision_tiny(64)
    images, state = _prepared(model, 64, tmp_path)
    variables = resnet.convert_torchvision(state, "resnet_tiny", ignore_prefixes=("fc.",))
    module = resnet.resnet_tiny(out_layers=("layer2", "layer3"), dtype=jnp.bfloat16)
    images_BxHxWx3 = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    got = jax.jit(module.apply)(variables, images_BxHxWx3)
    want = _torchvision_stages(model, images)
    assert got["layer3"].dtype == jnp.bfloat16
    params = jax.eval_shape(module.init, jax.random.key(0), images_BxHxWx3)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    for stage in ("layer2", "layer3"):
        error = np.abs(np.asarray(got[stage], np.float64) - want[stage]).max()
        # bfloat16 keeps 8 mantissa bits: a few percent of the range, far from a wrong network.
        assert 0 < error < 0.05 * np.abs(want[stage]).max(), (stage, error)
