"""FID between real and generated images, through clean-fid (the paper's tool); the Fréchet distance itself.

    fid("coco_val_512/", generated_images)      # needs `pip install clean-fid` (it pulls torchvision)

clean-fid is not a dependency of sae_utils: it requires torchvision, which the project's CPU environment does
not install, and it downloads Inception weights on first use. Install it where you evaluate (a GPU machine,
Colab). The real reference set the paper compares against is not stated in the facts this package builds
from: say which one you use when you report FID.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

from sae_utils.evaluation.images import ImageInput, to_pil_images
from sae_utils.evaluation.loading import MetricModelNotAvailable


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features: (N, D) -> mean (D,), covariance (D, D) (unbiased, as clean-fid and pytorch-fid)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"Expected features (N >= 2, D); got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)): the squared Fréchet distance of two
    Gaussians. A singular product gets `eps` added to both diagonals, as in pytorch-fid."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"Shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}.")
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(len(mu1)) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    root = np.real(root)  # sqrtm returns tiny imaginary parts from round-off
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def fid(real: str | os.PathLike | ImageInput, generated: str | os.PathLike | ImageInput,
        mode: str = "clean", device: str = "cuda", num_workers: int = 0) -> float:
    """FID with clean-fid's `compute_fid`; each side is a folder of images or images in memory."""
    if importlib.util.find_spec("cleanfid") is None:
        raise MetricModelNotAvailable(
            "FID needs clean-fid, which sae_utils does not install: `pip install clean-fid` (it pulls "
            "torchvision, so do it on the machine you evaluate on, not in the CPU test environment). It "
            "downloads Inception weights on first use.")
    from cleanfid import fid as clean_fid

    with tempfile.TemporaryDirectory() as scratch:
        folders = [_as_folder(side, Path(scratch) / name) for side, name in ((real, "real"), (generated, "gen"))]
        return float(clean_fid.compute_fid(*folders, mode=mode, device=device, num_workers=num_workers))


def _as_folder(images, scratch: Path) -> str:
    if isinstance(images, (str, os.PathLike)):
        if not Path(images).is_dir():
            raise FileNotFoundError(f"{images} is not a folder of images.")
        return str(images)
    scratch.mkdir()
    for i, image in enumerate(to_pil_images(images)):
        image.save(scratch / f"{i:06d}.png")
    return str(scratch)
