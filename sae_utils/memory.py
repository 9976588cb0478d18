"""Memory presets for finetuning, per model family and card: a 15 GB T4 (Colab) and a 24 GB card.

    memory_preset("sdxl", "t4").settings   # {"mixed_precision": "fp16", "batch_size": 1, ...}
    preset("t4", model="sdxl", pairs=[("cat", "dog")])   # a FinetuneConfig with them (sae_utils.finetune)

Only SD 1.x's presets were measured (an H200 capped to the card's memory; README: the course's defaults peak at
4.1 GiB). The SD 2.x and SDXL ones are **not yet measured**: no GPU was available when they were written
(`python benchmarks/family_memory.py` measures them all on one, with the real architectures' random weights).
Their numbers are estimates, and each says its arithmetic:

- weights in fp16, 2 bytes a value: SDXL's UNet 2,567 M values (4.78 GiB), its text encoders 123 M + 695 M
  (1.52 GiB), its autoencoder 84 M (0.16 GiB); SD 2.x: 865 M (1.61 GiB), 340 M (0.63 GiB), 84 M (0.16 GiB);
- the trained keys (every cross-attention `to_k`: SDXL 70 tensors, 170,393,600 values; SD 2.x 16, 12,779,520;
  SD 1.x 16, 9,584,640) held four times in float32 (the weights, their gradients, AdamW's two moments) plus the
  originals the finetuner keeps for undo and the norm loss: 5 x 4 bytes a value, less the fp16 copy they replace:
  SDXL 3.17 - 0.32 = 2.85 GiB, SD 2.x 0.22 GiB;
- activations kept for backward, per sample, computed from the autograd graph of one training forward on the
  meta device (shapes only; `benchmarks/memory_estimate.py`), with the maps' early exit and not counting the
  self-attention probabilities that the GPU's fused attention kernels never store: SDXL at 1024 px 4.35 GiB
  (0.25 GiB with gradient checkpointing), at 768 px 2.46 GiB; SD 2.x at 768 px 0.70 GiB; SD 1.x at 512 px 0.33 GiB
  (with its 2.0 GiB of fp16 weights and 0.2 GiB of keys that predicts 3.5 GiB at batch 4, against the 4.1 GiB
  measured for the course's defaults: the estimates leave out the CUDA context, the allocator's slack and the
  kernels' workspaces, about 0.6 GiB there).
"""
from __future__ import annotations

from dataclasses import dataclass, field

CARDS = {"t4": "a 15 GB card (Colab's T4: fp16 only, no bf16)", "24gb": "a 24 GB card (RTX 3090/4090, A10, L4)"}


@dataclass(frozen=True)
class MemoryPreset:
    """The memory-related FinetuneConfig settings for one family on one card, and what is known about them."""
    family: str
    card: str
    settings: dict
    status: str  # "measured" or "not yet measured"
    estimate: str  # the peak it is expected to reach, and how that was worked out ("" when measured)
    changes: str = ""  # what the settings change in the run, against the paper's batch 4 at the native size
    alternatives: dict = field(default_factory=dict)  # name -> settings, if the preset turns out not to fit
    measured: str = ""  # the measured peak, and where it was measured ("" when not yet measured)


SDXL_T4_NOTE = (
    "batch 1 x 4 gradient accumulation is the same global batch of 4, the same samples (each a function of the seed, "
    "the step and its index) and the same learning rate, so the same update up to float rounding; gradient "
    "checkpointing recomputes each block's forward in backward: the same numbers, a slower step (estimate: a third "
    "slower). Batch 4 at 1024 px does not fit: 9.3 GiB before activations + 4 x 4.35 GiB = 26.7 GiB.")

MEMORY_PRESETS = {
    ("sd1", "t4"): MemoryPreset("sd1", "t4", dict(mixed_precision="fp16", batch_size=4), "measured",
                                "", "none: the paper's batch 4 at 512 px",
                                measured="4.1 GiB under a 15 GiB cap (an H200; notebook 03's table)"),
    ("sd1", "24gb"): MemoryPreset("sd1", "24gb", dict(mixed_precision="auto", batch_size=4), "measured",
                                  "", "none (bf16 where the card has it)",
                                  measured="fp16 as on the T4, 4.1 GiB; bf16 2.36 GiB with compile='cuda-graph' "
                                           "(an H200; README's Performance table)"),
    ("sd2", "t4"): MemoryPreset(
        "sd2", "t4", dict(mixed_precision="fp16", batch_size=4), "not yet measured",
        "estimate 5.4 GiB + overheads, about 6 GiB: 2.40 GiB of fp16 weights + 0.22 GiB of keys and optimizer + "
        "4 x 0.70 GiB of activations at 768 px",
        "none: batch 4 at the model's native size (768 px for 2.0/2.1, 512 px for the -base models, less)"),
    ("sd2", "24gb"): MemoryPreset(
        "sd2", "24gb", dict(mixed_precision="auto", batch_size=4), "not yet measured",
        "estimate about 6 GiB, as on the T4 (bf16 weights are as large as fp16 ones)", "none"),
    ("sdxl", "t4"): MemoryPreset(
        "sdxl", "t4", dict(mixed_precision="fp16", batch_size=1, gradient_accumulation_steps=4,
                           gradient_checkpointing=True), "not yet measured",
        "estimate 9.6 GiB + overheads, about 10.5 GiB of 15: 6.46 GiB of fp16 weights + 2.85 GiB of keys and "
        "optimizer + 0.25 GiB of checkpointed activations (batch 1, 1024 px) + one block's recomputation; without "
        "checkpointing 9.3 + 4.35 = 13.7 GiB + overheads, too close to the T4's 14.7 GiB",
        SDXL_T4_NOTE,
        alternatives={"768 px (if 1024 px does not fit)": dict(
            mixed_precision="fp16", batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True,
            image_size=768)}),
    ("sdxl", "24gb"): MemoryPreset(
        "sdxl", "24gb", dict(mixed_precision="auto", batch_size=2, gradient_accumulation_steps=2),
        "not yet measured",
        "estimate 18.0 GiB + overheads, about 19 GiB of 24: 9.3 GiB of weights, keys and optimizer + 2 x 4.35 GiB "
        "of activations at 1024 px; batch 4 (26.7 GiB) does not fit without gradient checkpointing",
        "batch 2 x 2 accumulation: the same global batch of 4 and the same update up to float rounding"),
}


def memory_preset(family: str, card: str) -> MemoryPreset:
    """The preset of `family` ("sd1", "sd2", "sdxl") on `card` ("t4", "24gb")."""
    if card not in CARDS:
        cards = ", ".join(f"{k!r} ({v})" for k, v in CARDS.items())
        raise ValueError(f"Unknown card {card!r}; the presets are for {cards}.")
    if (family, card) not in MEMORY_PRESETS:
        raise ValueError(f"Unknown family {family!r}; the families are 'sd1', 'sd2', 'sdxl'.")
    return MEMORY_PRESETS[(family, card)]


def memory_table() -> str:
    """Every preset as a markdown table (the README's and notebook 03's)."""
    rows = ["| family | card | settings | status | peak |", "|---|---|---|---|---|"]
    for preset in MEMORY_PRESETS.values():
        settings = ", ".join(f"{k}={v}" for k, v in preset.settings.items())
        rows.append(f"| {preset.family} | {preset.card} | {settings} | {preset.status} | "
                    f"{preset.measured or preset.estimate} |")
    return "\n".join(rows)
