"""Checks an installed environment, as the last step of the image build (infra/Dockerfile).

    python infra/check_image.py --gpu --headless --ray 2.60.0 --torch 2.13.0   # the image; exits 1 on a problem
    python infra/check_image.py --gpu       # a GPU install: onnxruntime-gpu alone, a CUDA torch
    python infra/check_image.py             # any install: exactly one onnxruntime

onnxruntime and onnxruntime-gpu install the same ``onnxruntime`` module. With both installed, the files of
whichever was installed last win (installing 1.31.1 of both in one pip command left the CPU build, without
CUDAExecutionProvider), and uninstalling either one deletes files the other needs. Exactly one of them
must be installed. ``get_available_providers()`` lists the providers compiled into the build, so ``--gpu``
needs no GPU.

opencv-python and opencv-python-headless share the ``cv2`` module the same way (insightface requires the
former, the package the latter); ``--headless`` requires the headless one alone, as in the image, which
has no libGL.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def onnxruntime_problems(gpu: bool | None = None) -> list[str]:
    """Problems with the installed onnxruntime distributions; ``gpu=None`` accepts either build."""
    installed = [d for d in ORT_DISTRIBUTIONS if _version(d) is not None]
    if len(installed) != 1:
        return [f"exactly one of {ORT_DISTRIBUTIONS} must be installed, found {installed or 'none'}"]
    if gpu is not None and installed != [ORT_DISTRIBUTIONS[1] if gpu else ORT_DISTRIBUTIONS[0]]:
        return [f"{installed[0]} is installed, but this is a {'GPU' if gpu else 'CPU'} install"]
    try:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
    except Exception as e:  # a module left broken by uninstalling the other distribution
        return [f"onnxruntime does not import cleanly: {type(e).__name__}: {e}"]
    if gpu and "CUDAExecutionProvider" not in providers:
        return [f"onnxruntime-gpu is installed but CUDAExecutionProvider is missing: {providers}"]
    return []


def opencv_problems() -> list[str]:
    """The image's OpenCV: opencv-python-headless alone, and ``cv2`` imports."""
    installed = [d for d in ("opencv-python", "opencv-python-headless") if _version(d) is not None]
    if installed != ["opencv-python-headless"]:
        return [f"only opencv-python-headless may provide cv2, found {installed or 'none'}"]
    try:
        import cv2  # noqa: F401
    except Exception as e:
        return [f"cv2 does not import: {type(e).__name__}: {e}"]
    return []


def detector_weight_problems() -> list[str]:
    """The default ensemble's MTCNN pass reads facenet-pytorch's packaged weights (installed with --no-deps)."""
    from rp_distributed.faces.backends import ModelFilesMissing
    from rp_distributed.faces.mtcnn_backend import weights_folder

    try:
        weights_folder()
    except ModelFilesMissing as exc:
        return [str(exc)]
    return []


def problems(gpu: bool | None = None, headless: bool = False, ray: str | None = None,
             torch: str | None = None) -> list[str]:
    found = onnxruntime_problems(gpu) + detector_weight_problems()
    if headless:
        found += opencv_problems()
    if ray is not None and _version("ray") != ray:
        found.append(f"ray {_version('ray')} is installed, the image pins {ray}")
    if torch is not None:
        import torch as t

        if t.__version__.split("+")[0] != torch:
            found.append(f"torch {t.__version__} is installed, the image pins {torch}")
        if gpu and not t.version.cuda:
            found.append(f"torch {t.__version__} is a CPU build")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="require onnxruntime-gpu (and a CUDA torch with --torch)")
    ap.add_argument("--headless", action="store_true", help="require opencv-python-headless alone")
    ap.add_argument("--ray", help="required ray version")
    ap.add_argument("--torch", help="required torch release (the local version tag is ignored)")
    args = ap.parse_args(argv)
    found = problems(True if args.gpu else None, args.headless, args.ray, args.torch)
    for p in found:
        print(f"check_image: {p}", file=sys.stderr)
    if not found:
        import rp_distributed  # noqa: F401  the package itself imports
        print("check_image: ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
