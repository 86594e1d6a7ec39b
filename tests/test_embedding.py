import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softpatch_jax import embedding


def numpy_adaptive_pool(x, out):
    """adaptive_avg_pool1d by its definition, one bin at a time."""
    length = x.shape[-1]
    cols = []
    for i in range(out):
        lo, hi = (i * length) // out, -((-(i + 1) * length) // out)
        cols.append(x[..., lo:hi].mean(-1))
    return np.stack(cols, -1)


@pytest.mark.parametrize(
    "length,out", [(4608, 1024), (9216, 1024), (360, 1024), (2048, 1024), (7, 3)]
)
def test_adaptive_pool_uneven_bins_match_definition(length, out):
    x = np.random.default_rng(length).normal(size=(3, length)).astype(np.float32)
    got = np.asarray(embedding.adaptive_avg_pool(jnp.asarray(x), out))
    np.testing.assert_allclose(
        got, numpy_adaptive_pool(x.astype(np.float64), out), rtol=1e-5, atol=1e-6
    )


def test_unfold_is_channel_major_with_zero_padding():
    x = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
    u = np.asarray(embedding.unfold(jnp.asarray(x), 3))  # [2, 3, 3, 18]
    # Centre position sees the whole 3x3 image; entry c*9 + dy*3 + dx is x[dy, dx, c].
    np.testing.assert_array_equal(
        u[:, 1, 1].reshape(2, 2, 9), x.transpose(0, 3, 1, 2).reshape(2, 2, 9)
    )
    # Corner (0, 0): the window's top row and left column fall in the zero padding.
    assert np.all(u[:, 0, 0].reshape(2, 2, 3, 3)[:, :, 0, :] == 0)


def test_embed_matches_torch_reference_ops():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    l2 = rng.normal(size=(2, 512, 28, 28)).astype(np.float32)
    l3 = rng.normal(size=(2, 1024, 14, 14)).astype(np.float32)

    # The reference (PatchCore/SoftPatch) pipeline, written with torch ops.
    def ref_layer(f, size):
        b, c = f.shape[:2]
        u = torch.nn.Unfold(3, padding=1, stride=1)(f)  # [B, C*9, h*w]
        h, w = f.shape[2:]
        u = u.reshape(b, c, 3, 3, h, w)
        if (h, w) != size:
            u = F.interpolate(
                u.reshape(-1, 1, h, w), size=size, mode="bilinear", align_corners=False
            )
            u = u.reshape(b, c, 3, 3, *size)
        u = u.permute(0, 4, 5, 1, 2, 3).reshape(-1, c * 9)  # [B*h*w, C*9]
        return F.adaptive_avg_pool1d(u[:, None], 1024)[:, 0]

    with torch.no_grad():
        t2, t3 = torch.from_numpy(l2), torch.from_numpy(l3)
        stacked = torch.stack(
            [ref_layer(t2, (28, 28)), ref_layer(t3, (28, 28))], 1
        )  # [B*P, 2, 1024]
        want = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), 1024)[:, 0].numpy()

    maps = {
        "layer2": jnp.asarray(l2.transpose(0, 2, 3, 1)),
        "layer3": jnp.asarray(l3.transpose(0, 2, 3, 1)),
    }
    got = jax.jit(embedding.embed, static_argnums=(1,))(maps, ("layer2", "layer3"))
    assert got.shape == (2, 28, 28, 1024)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 1024), want, atol=1e-5)


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(1, 5, 7, 2)).astype(np.float32)
    got = np.asarray(embedding.resize_bilinear(jnp.asarray(x), 13, 11))
    want = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            size=(13, 11),
            mode="bilinear",
            align_corners=False,
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
