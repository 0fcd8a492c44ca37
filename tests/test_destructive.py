"""The destructive methods' pixels: the blur is the Gaussian it is documented to be, however it is computed."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from rp_distributed.destructive import gaussian_blur


@pytest.mark.parametrize("sigma", [1.5, 7.9, 20.0, 84.0, 130.0])
def test_the_blur_is_the_direct_gaussian_within_two_grey_levels(sigma):
    crop = cv2.resize(data.astronaut(), (1024, 1024), interpolation=cv2.INTER_AREA)
    direct = cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    diff = np.abs(gaussian_blur(crop, sigma).astype(int) - direct.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (sigma, diff.max(), diff.mean())


def test_a_wide_blur_of_an_odd_sized_region_keeps_its_shape():
    region = data.camera()[37:290, 11:400]  # grey, 253 x 389
    out = gaussian_blur(region, 40.0)
    assert out.shape == region.shape and out.dtype == region.dtype
    direct = cv2.GaussianBlur(region, (0, 0), sigmaX=40.0, sigmaY=40.0, borderType=cv2.BORDER_REFLECT)
    assert np.abs(out.astype(int) - direct.astype(int)).max() <= 2


@pytest.mark.parametrize("side", [4, 9, 17, 29])
def test_pixelate_leaves_no_pixel_of_a_tiny_face(side):
    """The default's small-face passes find faces of 9-20 px. Pixelated into 10 cells, a region that narrow came
    back through the two resizes as its own pixels; now every cell is at least 3 px, so the face is a few blocks."""
    from types import SimpleNamespace

    from rp_distributed.destructive import Pixelate, pixelate

    face = cv2.resize(data.astronaut()[20:220, 150:320], (side, side + side // 3), interpolation=cv2.INTER_AREA)
    out = Pixelate().region(face, SimpleNamespace(pixelate_blocks=10))
    cells = max(1, side // 3) * max(1, (side + side // 3) // 3)
    assert out.shape == face.shape and len(np.unique(out.reshape(-1, 3), axis=0)) <= cells
    crop = np.ascontiguousarray(face[:side, :side])
    assert len(np.unique(pixelate(crop, np.array([0, 0, side, side], np.float32), 10).reshape(-1, 3), axis=0)) <= \
        max(1, side // 3) ** 2
