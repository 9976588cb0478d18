"""Estimate a finetuning step's memory per model family without a GPU: shapes only, on the meta device.

    python benchmarks/memory_estimate.py            # about a minute on a CPU; no weights are downloaded

For SD 1.x, SD 2.x (at 768 px) and SDXL (at 1024 and 768 px) it builds the real UNet on the meta device (no memory,
no arithmetic), freezes it but the cross-attention keys, and runs one training forward with the map-level capture and
its early exit, summing the bytes of every tensor autograd saves for backward (parameters excluded). The
self-attention probabilities (B, heads, L, L) are counted apart: the GPU's fused attention kernels (flash,
memory-efficient) never store them, the meta device's reference path does. These are estimates (no CUDA context,
allocator slack or kernel workspace); sae_utils/memory.py quotes them.
"""
import torch
from diffusers import UNet2DConditionModel

from sae_utils.attention import capture_cross_attention, forward_until_captured, map_resolution
from sae_utils.conditioning import zero_conditions
from sae_utils.delta import trainable_parameter_names
from sae_utils.families import SDXL_UNET_CONFIG
from sae_utils.models import SD_V1_UNET_CONFIG

SD2_UNET_CONFIG = {**SD_V1_UNET_CONFIG, "sample_size": 96, "cross_attention_dim": 1024,
                   "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}
CASES = [("sd1", SD_V1_UNET_CONFIG, 64), ("sd2", SD2_UNET_CONFIG, 96), ("sdxl", SDXL_UNET_CONFIG, 128),
         ("sdxl", SDXL_UNET_CONFIG, 96)]
GIB = 2 ** 30


def saved_activations(config: dict, latent: int, checkpointing: bool) -> tuple[float, float, int, int]:
    """(GiB saved for backward per sample, GiB of self-attention probabilities among them, trained tensors, values)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(torch.float16)
    unet.requires_grad_(False)
    names = trainable_parameter_names(unet, "k")
    for name in names:
        unet.get_parameter(name).requires_grad_(True)
    values = sum(unet.get_parameter(name).numel() for name in names)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    params = {id(p) for p in unet.parameters()}
    seen, kept, probabilities = set(), [0], [0]

    def pack(x):
        base = x if x._base is None else x._base
        if id(base) in params or id(x) in params or id(base) in seen:
            return x
        seen.add(id(base))
        size = base.numel() * base.element_size()
        is_self_attention = x.ndim == 4 and x.shape[-1] == x.shape[-2] and x.shape[-1] >= 256
        (probabilities if is_self_attention else kept)[0] += size
        return x

    resolution = map_resolution(unet, latent)
    with capture_cross_attention(unet, resolution=resolution, latent_size=latent, keep="last", cfg=False) as store:
        store.stop_when_complete = True
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            sample = torch.zeros(1, 4, latent, latent, device="meta", dtype=torch.float16)
            forward_until_captured(unet, sample, torch.zeros(1, device="meta"),
                                   **zero_conditions(unet, 1, latent * 8, device="meta", dtype=torch.float16))
    return kept[0] / GIB, probabilities[0] / GIB, len(names), values


if __name__ == "__main__":
    print("| family | image | keys (tensors, values, fp16 MB) | saved per sample | with gradient checkpointing "
          "| self-attention probabilities (not kept on a GPU) |\n|---|---|---|---|---|---|")
    for family, config, latent in CASES:
        plain, probs, tensors, values = saved_activations(config, latent, checkpointing=False)
        checkpointed, _, _, _ = saved_activations(config, latent, checkpointing=True)
        print(f"| {family} | {latent * 8} px | {tensors}, {values:,}, {values * 2 / 1e6:.1f} | {plain:.2f} GiB "
              f"| {checkpointed:.2f} GiB | {probs:.2f} GiB |")
