"""sae_utils: Separate-and-Enhance (Bao et al., SIGGRAPH 2024), to learn, reproduce and use.

The course follows the data, one module a step:

    tokens      word -> token positions            token_positions, word_token_positions
    models      a StableDiffusionPipeline           load_pipeline("CompVis/stable-diffusion-v1-4" | "toy" | "tiny")
    families    SD 1.x, 2.x, XL and their twins     family_of, load_pipeline("sdxl" | "tiny-sdxl" | "tiny-sd2")
    conditioning  what each family's UNet reads     unet_conditions(pipe, prompts)
    attention   capture cross-attention maps        capture_cross_attention(pipe) -> store
    maps        word maps, failure signals          gather_word_maps, peak_activation, overlap, attention_stats
    losses      the two losses                      separate_loss, enhance_loss, sepen_loss
    finetune    train the keys, data-free           FinetuneConfig, Finetuner, preset
    memory      presets per family and card         memory_preset("sdxl", "t4")
    delta       the trained tensors on disk         save_delta, load_delta, apply_delta
    sampling    images for prompts x seeds          sampler_defaults
    toyworld    a shape world and its own model     (sae_utils.toyworld)
    evaluation  CLIP / BLIP / detection metrics     (sae_utils.evaluation)
    viz         heat maps, grids, curves            (sae_utils.viz)

Command line: `sae-finetune`, `sae-generate`, `sae-evaluate`, `sae-demo` (or `python -m sae_utils ...`).
"""
from .attention import AttentionStore, CrossAttentionCaptureProcessor, capture_cross_attention, layers_at_resolution
from .delta import Delta, apply_delta, load_delta, save_delta
from .finetune import FinetuneConfig, Finetuner, preset
from .losses import attend_and_excite_loss, enhance_loss, sepen_loss, sepen_loss_terms, separate_loss
from .maps import attention_stats, gather_word_maps, overlap, peak_activation
from .models import DEFAULT_MODEL, ModelNotAvailableError, clip_tokenizer, load_pipeline, tiny_pipeline
from .prompts import PairSampler, pair_prompt, pair_words
from .sampling import sampler_defaults
from .tokens import PromptTooLongError, WordNotInPromptError, token_positions, word_token_positions

__version__ = "0.1.0"
REPO_URL = "https://github.com/sepen-course/separate-and-enhance"

__all__ = [
    "AttentionStore", "CrossAttentionCaptureProcessor", "capture_cross_attention", "layers_at_resolution",
    "Delta", "apply_delta", "load_delta", "save_delta", "FinetuneConfig", "Finetuner", "preset",
    "attend_and_excite_loss", "enhance_loss", "sepen_loss", "sepen_loss_terms", "separate_loss",
    "attention_stats", "gather_word_maps", "overlap", "peak_activation",
    "DEFAULT_MODEL", "ModelNotAvailableError", "clip_tokenizer", "load_pipeline", "tiny_pipeline",
    "PairSampler", "pair_prompt", "pair_words", "sampler_defaults",
    "PromptTooLongError", "WordNotInPromptError", "token_positions", "word_token_positions",
]
