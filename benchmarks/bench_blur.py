"""The destructive blur on a 1024-px aligned crop: the direct Gaussian kernel against ``destructive.gaussian_blur``
(computed on a shrunk copy), per sigma: milliseconds (best of 3, one thread) and the largest pixel difference.

    python benchmarks/bench_blur.py
"""

from __future__ import annotations

import time

import cv2
import numpy as np
from skimage import data

from rp_distributed.destructive import gaussian_blur


def best_ms(fn, *args) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def direct(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def main() -> None:
    cv2.setNumThreads(1)
    crop = cv2.resize(data.astronaut(), (1024, 1024), interpolation=cv2.INTER_AREA)
    print("sigma_px  direct_ms  ours_ms  max_diff  mean_diff")
    # 84 px: the default blur_strength (0.12) of a face ~700 px wide in the 1024-px crop.
    for sigma in (4.0, 20.0, 50.0, 84.0, 120.0):
        diff = np.abs(gaussian_blur(crop, sigma).astype(int) - direct(crop, sigma).astype(int))
        print(f"{sigma:8.0f}  {best_ms(direct, crop, sigma):9.1f}  {best_ms(gaussian_blur, crop, sigma):7.1f}  "
              f"{diff.max():8d}  {diff.mean():9.2f}")


if __name__ == "__main__":
    main()
