"""The torch-free checkpoint reader vs torch.load(weights_only=True); refusal of other globals."""

import os
import pickle
import zipfile

import numpy as np
import pytest

from softpatch_jax.models import torch_pickle

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _as_numpy(t: "torch.Tensor") -> np.ndarray:
    # numpy has no bfloat16, so compare those bit patterns as int16.
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy()
    return t.contiguous().numpy()


def _assert_bitwise_equal(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for name, tensor in ref.items():
        want = _as_numpy(tensor)
        got = ours[name].view(np.int16) if tensor.dtype == torch.bfloat16 else ours[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


def _odd_tensors() -> dict:
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(100, dtype=torch.float32)
    return {
        "transposed_sliced": torch.randn(6, 8, generator=gen).t()[1:, ::3],
        "offset_view": base[10:30].view(4, 5),
        "second_view_same_storage": base[50:60],
        "expanded": torch.randn(3, 1, generator=gen).expand(3, 4),
        "half": torch.randn(3, 5, generator=gen).half(),
        "bfloat16": torch.randn(2, 7, generator=gen).bfloat16(),
        "int64": torch.arange(-5, 7),
        "int32": torch.arange(4, dtype=torch.int32),
        "uint8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "float64": torch.randn(2, 2, generator=gen, dtype=torch.float64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch_load_on_resnet_state_dict(tmp_path, zip_format):
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    _assert_bitwise_equal(torch_pickle.load_state_dict(path), torch.load(path, weights_only=True))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch_load_on_strided_offset_and_typed_tensors(tmp_path, zip_format):
    path = tmp_path / "odd.pth"
    torch.save(_odd_tensors(), path, _use_new_zipfile_serialization=zip_format)
    ours = torch_pickle.load_state_dict(path)
    _assert_bitwise_equal(ours, torch.load(path, weights_only=True))
    assert ours["transposed_sliced"].flags.c_contiguous
    assert ours["float64"].dtype == np.float64 and ours["int64"].dtype == np.int64


def test_parameters_load_as_arrays(tmp_path):
    path = tmp_path / "params.pth"
    conv = torch.nn.Conv2d(3, 4, 3)
    torch.save({"weight": conv.weight, "bias": conv.bias}, path)
    _assert_bitwise_equal(torch_pickle.load_state_dict(path), torch.load(path, weights_only=True))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_zip_checkpoint(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_refuses_os_system(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Evil(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    if zip_format:
        _write_zip_checkpoint(path, payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|nt|os)\.system"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [("builtins", "eval"), ("torch.storage", "_load_from_bytes"), ("numpy", "frombuffer")],
)
def test_refuses_other_globals_by_name(tmp_path, module, name):
    # GLOBAL opcode naming module.name, then an empty tuple, REDUCE, STOP.
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    path = tmp_path / "global.pth"
    _write_zip_checkpoint(path, payload)
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        torch_pickle.load_state_dict(path)


def test_rejects_non_checkpoint_and_non_state_dict(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        torch_pickle.load_state_dict(junk)
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "weight": torch.ones(2)}, nested)
    with pytest.raises(ValueError, match="epoch"):
        torch_pickle.load_state_dict(nested)


def test_out_of_bounds_strides_are_refused(tmp_path):
    # A hand-edited tensor whose stride would read past its storage must not reach as_strided.
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as archive:
        records = {n: archive.read(n) for n in archive.namelist()}
    pkl_name = next(n for n in records if n.endswith("data.pkl"))
    # size (6,) -> (7,) in the pickled size tuple: K\x06 (BININT1 6) is the size element.
    assert records[pkl_name].count(b"K\x06\x85") == 1
    records[pkl_name] = records[pkl_name].replace(b"K\x06\x85", b"K\x07\x85")
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    with pytest.raises(pickle.UnpicklingError, match="reaches element 6"):
        torch_pickle.load_state_dict(bad)
