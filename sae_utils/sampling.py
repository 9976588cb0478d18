"""Sampling: the sampler settings each model is evaluated with.

Real Stable Diffusion is sampled as the SepEn evaluation does (50 steps, guidance 6.0); the toy model ships
its own defaults in its folder (toy_model.json); `tiny` has no meaningful images and uses SD's settings.
"""
from __future__ import annotations

from .models import model_info

SD_SAMPLING = {"num_inference_steps": 50, "guidance_scale": 6.0}  # the SepEn evaluation settings [ref]


def sampler_defaults(pipe) -> dict:
    """`num_inference_steps` and `guidance_scale` for this pipeline (a fresh dict: change it freely)."""
    return dict(model_info(pipe).get("sampling") or SD_SAMPLING)
