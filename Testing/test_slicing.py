import numpy as np
import pytest
import torch

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.slicing import Orientation, extract_slices, insert_slices


def rotation(axis_perm, signs):
    d = np.zeros((3, 3))
    for col, (row, sign) in enumerate(zip(axis_perm, signs)):
        d[row, col] = sign
    return d


DIRECTIONS = {
    "axial-lps": np.eye(3),
    "axial-ras": np.diag([-1.0, -1.0, 1.0]),
    "sagittal": rotation((1, 2, 0), (1, -1, 1)),  # i -> P, j -> -S, k -> L
    "coronal": rotation((0, 2, 1), (1, -1, 1)),  # i -> L, j -> -S, k -> P
}


@pytest.mark.parametrize("name", DIRECTIONS)
def test_canonical_axis_0_is_superior(name):
    d = DIRECTIONS[name]
    o = Orientation.from_direction(d, (1.0, 2.0, 3.0))
    shape = (4, 5, 6)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(float)
    s_coord = (ijk @ d.T)[..., 2]  # superior component of the LPS position
    c = o.to_canonical(s_coord)
    assert np.all(np.diff(c, axis=0) > 0)  # strictly increasing along canonical axis 0
    assert np.array_equal(o.from_canonical(c), s_coord)


def test_oblique_direction_uses_the_nearest_axes():
    a = np.deg2rad(20)
    d = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    o = Orientation.from_direction(d, (1, 1, 1))
    assert o.perm == (0, 1, 2) and o.flips == (False, False, False)


def test_degenerate_direction_is_refused():
    with pytest.raises(CDMSegmentError, match="degenerate"):
        Orientation.from_direction(np.array([[1, 1, 0], [0, 0, 0], [0, 0, 1.0]]), (1, 1, 1))


@pytest.mark.parametrize("name", DIRECTIONS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_extract_then_insert_returns_the_input_grid(name, axis):
    rng = np.random.default_rng(0)
    a = rng.random((7, 9, 11)).astype(np.float32)
    o = Orientation.from_direction(DIRECTIONS[name], (1.0, 1.5, 3.0))
    slices, stack = extract_slices(a[None], o, axis, 32)
    assert slices.shape[1:] == (1, 32, 32)
    back = insert_slices(slices[:, 0], stack)
    assert back.shape == a.shape and back.dtype == torch.float32
    # smooth content survives the round trip through resampling
    smooth = np.fromfunction(lambda k, j, i: np.sin(k / 3) + np.cos(j / 4) + i / 11, a.shape).astype(np.float32)
    slices, stack = extract_slices(smooth[None], o, axis, 64, background=0.0)
    error = np.abs(insert_slices(slices[:, 0], stack).numpy() - smooth)
    assert error[1:-1, 1:-1, 1:-1].mean() < 0.03  # the border mixes with the padding


def test_padding_keeps_pixels_isotropic():
    """A 10 x 40 voxel slice at 4 x 1 mm is 40 x 40 mm: no padding; at 1 x 1 mm it is padded to 40 x 40."""
    o_aniso = Orientation.from_direction(np.eye(3), (1.0, 4.0, 2.0))
    _, stack = extract_slices(np.zeros((1, 5, 10, 40), np.float32), o_aniso, 0, 16)
    assert stack.pad == (0, 0, 0, 0)
    o_iso = Orientation.from_direction(np.eye(3), (1.0, 1.0, 2.0))
    _, stack = extract_slices(np.zeros((1, 5, 10, 40), np.float32), o_iso, 0, 16)
    assert stack.pad == (15, 15, 0, 0)


def test_named_and_ijk_axes():
    o = Orientation.from_direction(DIRECTIONS["sagittal"], (1, 1, 1))
    assert o.canonical_axis("auto") == 0 and o.canonical_axis("sagittal") == 2
    assert o.canonical_axis(1) == 0  # j runs along S
    assert o.canonical_axis("2") == 2  # k runs along L
    with pytest.raises(CDMSegmentError, match="slice axis"):
        o.canonical_axis(3)
    with pytest.raises(CDMSegmentError, match="unknown slice axis"):
        o.canonical_axis("oblique")


def test_slice_content_is_where_it_was():
    a = np.zeros((6, 20, 20), np.float32)
    a[2, 5:10, 12:16] = 1.0
    o = Orientation.from_direction(np.eye(3), (1, 1, 1))
    slices, stack = extract_slices(a[None], o, 0, 20)
    assert torch.nonzero(slices.sum((1, 2, 3))).flatten().tolist() == [2]
    assert np.array_equal(insert_slices(slices[:, 0], stack).numpy() > 0.5, a > 0.5)
