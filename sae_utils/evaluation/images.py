"""Images in any of the shapes the metrics accept, as a list of RGB PIL images; and batching."""
from __future__ import annotations

import os
from typing import Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image

ImageInput = Union[Sequence[Union[Image.Image, str, os.PathLike, np.ndarray]], torch.Tensor]
T = TypeVar("T")


def to_pil_images(images: ImageInput) -> list[Image.Image]:
    """PIL images, image files, uint8 arrays (H, W, 3), or a float tensor (N, 3, H, W) in [0, 1].

    A float tensor is quantised to uint8 first, as saving it to PNG would, so that scoring images in memory
    and scoring the files written from them agree.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"An image tensor must be float (N, 3, H, W) in [0, 1]; got {images.dtype} "
                             f"{tuple(images.shape)}. Pass PIL images or uint8 arrays otherwise.")
        if images.min() < 0 or images.max() > 1:
            raise ValueError("An image tensor must hold values in [0, 1] (diffusers' output_type='pt' does); "
                             f"got [{images.min().item():.3g}, {images.max().item():.3g}].")
        arrays = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]
    if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)):
        raise TypeError("Pass a list of images (even for one image), e.g. [image].")
    out = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"An image array must be uint8 (H, W, 3); got {image.dtype} {image.shape}.")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"Cannot read an image from a {type(image).__name__}; pass PIL images, file paths, "
                            "uint8 arrays (H, W, 3) or a float tensor (N, 3, H, W).")
        out.append(image.convert("RGB"))
    if not out:
        raise ValueError("No images given.")
    return out


def batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]
