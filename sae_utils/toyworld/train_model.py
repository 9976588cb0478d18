"""Train the toy text-to-image model: `python -m sae_utils.toyworld.train_model --out DIR [--steps N]`.

Two stages, both resumable (run the same command again and it continues where it stopped, bit for bit):
1. the autoencoder, on renders (reconstruction + a tiny KL term);
2. the UNet and the text encoder, jointly, as a latent diffusion model (epsilon prediction, cosine
   schedule, min-SNR weighting, 10% empty captions for classifier-free guidance, EMA of the weights).
Every `eval_every` steps the EMA model draws single- and two-object samples that the shipped evaluator
scores, and a grid is saved, so you can watch it learn. `--export FOLDER` writes the EMA model as a
standard diffusers folder in fp16 (the shipped `toy` model lives in sae_utils/toyworld/model).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention import capture_cross_attention, layers_at_resolution
from ..checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from . import architecture as arch
from .training_data import check_word_order, kind_weights, training_batch
from ..tokens import token_positions
from .world import COLORS, KINDS, object_masks, pair_split, prompt_for


@dataclass
class ToyTrainConfig:
    seed: int = 0
    # the training distribution
    split: str = "collide"  # which pairs are held out (world.SPLITS)
    p_two: float = 0.1  # share of two-object scenes (seen pairs only)
    p_color: float = 0.25  # chance that an object is named with its colour
    p_uncond: float = 0.1  # empty captions, for classifier-free guidance
    # how often each kind is drawn: "uniform" or "ring=0.25,cross=0.25" (training_data.kind_weights)
    kind_frequencies: str = "uniform"
    # how a pair is named: "either" order, or "fixed" (world.KINDS order: with text_layers > 0, a causal encoder,
    # a held-out pair then puts its second word after a first word it never followed; training_data.training_example)
    word_order: str = "either"
    # stage 1: autoencoder
    vae_steps: int = 3000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # stage 2: diffusion
    steps: int = 40000
    batch: int = 64
    lr: float = 2e-4
    warmup: int = 500
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    # attention prior: pull each object word's cross-attention map (where the word is read) towards the object's
    # pixels, KL(mask || map) at these resolutions; SD's localised object maps emerge at scale, the toy's need it
    attention_prior: float = 0.0
    attention_prior_resolutions: tuple[int, ...] = (16, 8)
    # "all" scenes, or "single"-object scenes only: on two-object scenes the prior would teach the very split of
    # attention between two words that SepEn is meant to learn, so a model to study SepEn on keeps it off them
    attention_prior_scenes: str = "all"
    grad_clip: float = 1.0
    unet_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    text_layers: int = 0
    # machinery
    # bf16 autocast: ~1.4x faster on CPUs with AVX512-BF16, ~14x slower on plain AVX2 (measured: 2.1 -> 30 s a step)
    bf16: bool = False
    threads: int = 0  # 0: torch's default
    checkpoint_every: int = 250
    eval_every: int = 2000  # 0: no monitoring samples
    eval_images: int = 48
    # warm start: a toy model folder whose weights (all three parts) replace the random initialisation; the
    # autoencoder stage is then skipped. For pilots: a model meant to test held-out pairs must start from scratch
    init_from: str = ""
    extra: dict = field(default_factory=dict)


# What a resumed run may not change (the model and its data); steps, lr, evaluation cadence may change.
FIXED_ON_RESUME = ("seed", "split", "p_two", "p_color", "p_uncond", "kind_frequencies", "word_order", "vae_batch",
                   "vae_kl_weight", "batch", "min_snr_gamma", "unet_channels", "layers_per_block", "text_layers",
                   "init_from")


def text_transformer_layers(text_encoder) -> torch.nn.ModuleList:
    """The CLIP text encoder's transformer layers (transformers 5.x dropped the `text_model.` level; 5.0 has it)."""
    return next(m for name, m in text_encoder.named_modules() if name.endswith("encoder.layers"))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the pipeline's image range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 1_000_003 + step) % (2**63))


class ToyTrainer:
    """Holds the models, optimiser and EMA; `run()` trains both stages, resuming from `out/checkpoint`."""

    def __init__(self, out: str | Path, config: ToyTrainConfig):
        self.out, self.config = Path(out), config
        torch.manual_seed(config.seed)
        self.vae = arch.build_autoencoder()
        self.unet = arch.build_unet(config.unet_channels, config.layers_per_block)
        self.text_encoder = arch.build_text_encoder(config.text_layers)
        self.tokenizer = arch.clip_tokenizer()
        self.noise_scheduler = arch.training_scheduler()
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
        self.diffusion_params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.diffusion_params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.diffusion_params]
        self.vae_step, self.step, self.seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self.split = pair_split(config.split)
        kind_weights(config.kind_frequencies)  # a mistyped spec fails now, not after the autoencoder stage
        check_word_order(config.word_order)
        if (self.out / "checkpoint").exists():
            self._load(self.out / "checkpoint")
        elif config.init_from:
            self._warm_start(Path(config.init_from))

    def _warm_start(self, folder: Path) -> None:
        """All weights from a toy model folder (same architecture: load_state_dict refuses another one).

        One exception: a text encoder with more transformer layers than the folder's. The folder's layers fill
        the first ones, and each new layer starts as the identity (its attention output and its MLP's last
        projection at zero, so both residual branches add nothing): the warm-started model draws exactly what
        the folder's draws, and training then learns what the new layers should mix in.
        """
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
        for name in ("vae", "unet"):
            getattr(self, name).load_state_dict(getattr(pipe, name).state_dict())
        have, want = pipe.text_encoder.config.num_hidden_layers, self.config.text_layers
        if have > want:
            raise ValueError(f"{folder}'s text encoder has {have} transformer layers and this run asks for {want} "
                             f"(--text-layers): a warm start can add layers, not drop them; use --text-layers {have}.")
        missing, unexpected = self.text_encoder.load_state_dict(pipe.text_encoder.state_dict(), strict=False)
        new_layers = text_transformer_layers(self.text_encoder)[have:]
        new_tensors = {id(t) for layer in new_layers for t in layer.state_dict(keep_vars=True).values()}
        own = self.text_encoder.state_dict(keep_vars=True)
        wrong = [k for k in missing if id(own[k]) not in new_tensors] + list(unexpected)  # only the new layers may lack
        if wrong:
            raise ValueError(f"{folder}'s text encoder does not match this run's: {wrong[:5]}")
        with torch.no_grad():
            for layer in new_layers:
                for projection in (layer.self_attn.out_proj, layer.mlp.fc2):
                    projection.weight.zero_()
                    projection.bias.zero_()
        self.config.extra["scaling_factor"] = float(pipe.vae.config.scaling_factor)
        self.vae.register_to_config(scaling_factor=self.config.extra["scaling_factor"])
        self.ema = [p.detach().clone() for p in self.diffusion_params]
        self.vae_step = self.config.vae_steps  # the autoencoder is trained already

    # -- stage 1 ---------------------------------------------------------------------------------------------
    def train_autoencoder(self) -> None:
        c = self.config
        bar = tqdm(total=c.vae_steps, initial=self.vae_step, desc="autoencoder")
        while self.vae_step < c.vae_steps:
            start = time.perf_counter()
            images, _ = training_batch(c.seed + 7, self.vae_step, c.vae_batch, p_two=0.5, p_color=0, p_uncond=0)
            x = _to_model_input(images)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
                posterior = self.vae.encode(x).latent_dist
                z = posterior.sample(generator=_step_generator(c.seed, 1, self.vae_step))
                recon = self.vae.decode(z).sample.float()
            loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + c.vae_kl_weight * posterior.kl().float().mean()
            self.vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_optimizer.step()
            self.vae_step += 1
            self.seconds += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.vae_step % c.checkpoint_every == 0 or self.vae_step == c.vae_steps:
                self._save()
        bar.close()
        if "scaling_factor" not in self.config.extra:
            self._set_scaling_factor()
            self._save_reconstructions()

    @torch.no_grad()
    def _set_scaling_factor(self) -> None:
        """Scale latents to unit variance, as SD's 0.18215 does for its autoencoder."""
        images, _ = training_batch(self.config.seed + 11, 0, 512, p_two=0.3, p_color=0, p_uncond=0)
        latents = self.vae.encode(_to_model_input(images)).latent_dist.mode()
        self.config.extra["scaling_factor"] = float(1.0 / latents.std())
        self.vae.register_to_config(scaling_factor=self.config.extra["scaling_factor"])
        self._save()

    @torch.no_grad()
    def _save_reconstructions(self) -> None:
        images, _ = training_batch(self.config.seed + 13, 0, 16, p_two=0.5, p_color=0, p_uncond=0)
        recon = self.vae.decode(self.vae.encode(_to_model_input(images)).latent_dist.mode()).sample
        recon = ((recon.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        error = float(np.abs(recon * 255 - images).mean())
        tqdm.write(f"autoencoder: mean absolute reconstruction error {error:.2f} / 255")
        _save_grid(np.concatenate([images / 255.0, recon]), self.out / "samples" / "autoencoder.png", columns=16)

    # -- stage 2 ---------------------------------------------------------------------------------------------
    def diffusion_loss(self, images: np.ndarray, captions: list[str], generator: torch.Generator,
                       scenes=None) -> torch.Tensor:
        c = self.config
        with torch.no_grad():
            latents = self.vae.encode(_to_model_input(images)).latent_dist.mode() * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(images),), generator=generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        ids = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        prior_layers = [layer for r in c.attention_prior_resolutions
                        for layer in layers_at_resolution(self.unet, r)] if c.attention_prior else None
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(capture_cross_attention(self.unet, layers=prior_layers, keep="last",
                                                                cfg=False)) if prior_layers else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
                text = self.text_encoder(ids)[0]
                prediction = self.unet(noisy, t, text).sample
        alpha_bar = self.noise_scheduler.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        weight = torch.clamp(snr, max=c.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        per_image = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weight * per_image).mean()
        if store is not None:
            loss = loss + c.attention_prior * self.attention_prior_loss(store, scenes, captions)
        return loss

    def attention_prior_loss(self, store, scenes, captions) -> torch.Tensor:
        """Mean over named objects and resolutions of KL(mask || map): the spatial distribution of an object
        word's attention should follow the object's pixels. It shapes where a word is read, not how much."""
        by_resolution: dict[int, list[torch.Tensor]] = {}
        for layer in store.layers:
            maps = store.layer_maps(layer)  # (B, T, h, w)
            by_resolution.setdefault(maps.shape[-1], []).append(maps)
        terms = []
        for resolution, maps in by_resolution.items():
            maps = torch.stack(maps).mean(0).float()
            for b, (scene, text) in enumerate(zip(scenes, captions)):
                if not text:
                    continue  # an empty caption (classifier-free guidance) names nothing
                if self.config.attention_prior_scenes == "single" and len(scene.objects) > 1:
                    continue
                masks = torch.from_numpy(object_masks(scene, arch.IMAGE_SIZE))[:, None]
                masks = F.adaptive_avg_pool2d(masks, resolution)[:, 0]  # (K, h, w) coverage
                for k, spec in enumerate(scene.objects):
                    word = maps[b, token_positions(self.tokenizer, text, spec.kind)].sum(0)
                    q = word / word.sum().clamp_min(1e-8)
                    target = masks[k] / masks[k].sum().clamp_min(1e-8)
                    terms.append((target * (torch.log(target + 1e-8) - torch.log(q + 1e-8))).sum())
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def train_diffusion(self) -> None:
        c = self.config
        self.vae.requires_grad_(False)
        bar = tqdm(total=c.steps, initial=self.step, desc="diffusion")
        while self.step < c.steps:
            start = time.perf_counter()
            images, captions, scenes = training_batch(c.seed, self.step, c.batch, c.p_two, c.p_color, c.p_uncond,
                                                      with_scenes=True, split=self.split,
                                                      kind_frequencies=c.kind_frequencies, word_order=c.word_order)
            loss = self.diffusion_loss(images, captions, _step_generator(c.seed, 2, self.step), scenes)
            for group in self.optimizer.param_groups:
                group["lr"] = c.lr * min(1.0, (self.step + 1) / c.warmup)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.diffusion_params, c.grad_clip)
            self.optimizer.step()
            decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for e, p in zip(self.ema, self.diffusion_params):
                    e.lerp_(p.detach(), 1 - decay)
            self.step += 1
            self.seconds += time.perf_counter() - start
            self.history.append({"step": self.step, "loss": round(loss.item(), 5)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if c.eval_every and (self.step % c.eval_every == 0 or self.step == c.steps):
                self.evaluate()
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self._save()
        bar.close()

    # -- monitoring and export -------------------------------------------------------------------------------
    def ema_pipeline(self):
        """A pipeline with copies of the EMA weights (training weights untouched)."""
        import copy

        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        with torch.no_grad():
            for target, value in zip(list(unet.parameters()) + list(text_encoder.parameters()), self.ema):
                target.copy_(value)
        pipe = arch.assemble_pipeline(self.vae, unet, text_encoder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def evaluate(self) -> dict:
        from .evaluator import objects_present

        try:
            objects_present(np.full((1, 32, 32, 3), 255, np.uint8), ["star"])
        except Exception as error:  # no evaluator weights yet: keep training, save the grid only
            tqdm.write(f"evaluation skipped ({error})")
            objects_present = None
        n = self.config.eval_images
        pipe = self.ema_pipeline()
        sets = {"single": [[k] for k in KINDS]}
        sets |= {"seen_pairs": self.split.seen, "target_pairs": self.split.held_out_target,
                 "control_pairs": self.split.held_out_control}
        sizes = {"single": n, "seen_pairs": n // 2, "target_pairs": n // 2, "control_pairs": n // 2}
        result = {"step": self.step, "seconds": round(self.seconds)}
        grids = []
        for name, prompts in sets.items():
            if not prompts:
                continue
            kinds = [list(prompts[i % len(prompts)]) for i in range(sizes[name])]
            images = pipe([prompt_for(k) for k in kinds], generator=torch.Generator().manual_seed(1234),
                          output_type="np", **arch.SAMPLING_DEFAULTS).images
            if objects_present is not None:
                present = objects_present((images * 255).round().astype(np.uint8), kinds)
                result[name] = round(present.all(dim=1).float().mean().item(), 3)
            grids.append(images[:16])
        self.history.append({"eval": result})
        tqdm.write(f"eval {json.dumps(result)}")
        _save_grid(np.concatenate(grids), self.out / "samples" / f"step-{self.step:06d}.png", columns=16)
        return result

    def evaluations(self) -> list[dict]:
        """Every evaluation of this run so far: the saved history, then the entries not yet saved."""
        saved = self.out / "history.jsonl"
        lines = saved.read_text().splitlines() if saved.exists() else []
        entries = [json.loads(line) for line in lines if line.strip()] + self.history
        return [entry["eval"] for entry in entries if "eval" in entry]

    def export(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Save the EMA model as a diffusers folder, plus `toy_model.json` (sampler defaults, provenance)."""
        folder = Path(folder)
        pipe = self.ema_pipeline().to(dtype=dtype)
        pipe.save_pretrained(folder, safe_serialization=True)
        info = {"sampling": arch.SAMPLING_DEFAULTS, "image_size": arch.IMAGE_SIZE,
                "map_resolution": arch.MAP_RESOLUTION,
                "vocabulary": list(KINDS) + list(COLORS),
                "pairs": {"split": self.split.name, "seen": self.split.seen,
                          "held_out_target": self.split.held_out_target,
                          "held_out_control": self.split.held_out_control},
                "training": {"config": dataclasses.asdict(self.config), "vae_steps": self.vae_step,
                             "diffusion_steps": self.step, "cpu_seconds": round(self.seconds),
                             "machine": f"{platform.processor() or platform.machine()}, "
                                        f"{torch.get_num_threads()} torch threads",
                             "command": command_line(self.config)},
                "evaluations": self.evaluations()[-8:],
                "parameters": {"unet": arch.count_parameters(pipe.unet),
                               "text_encoder": arch.count_parameters(pipe.text_encoder),
                               "vae": arch.count_parameters(pipe.vae)}}
        (folder / "toy_model.json").write_text(json.dumps(info, indent=1))
        return folder

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _save(self) -> None:
        tensors = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        tensors |= {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors |= {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}
        tensors |= {f"ema.{i}": e for i, e in enumerate(self.ema)}
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer, "optimizer")
        vae_tensors, vae_meta = optimizer_to_tensors(self.vae_optimizer, "vae_optimizer")
        state = {"config": dataclasses.asdict(self.config), "vae_step": self.vae_step, "step": self.step,
                 "seconds": self.seconds, "optimizer": opt_meta, "vae_optimizer": vae_meta}
        save_checkpoint(self.out / "checkpoint", tensors | opt_tensors | vae_tensors, state)
        with open(self.out / "history.jsonl", "a") as f:
            for entry in self.history:
                f.write(json.dumps(entry) + "\n")
        self.history.clear()

    def _load(self, folder: Path) -> None:
        tensors, state = load_checkpoint(folder)
        saved = state["config"]
        changed = {k: (saved.get(k), getattr(self.config, k)) for k in FIXED_ON_RESUME
                   if k in saved and _plain(saved[k]) != _plain(getattr(self.config, k))}
        if changed:
            raise ValueError(f"The checkpoint in {folder} was trained with other settings {changed} (saved, "
                             "asked). Use another --out folder, or the saved settings.")
        self.config.extra = saved.get("extra", {})
        defaults = dataclasses.asdict(ToyTrainConfig())  # a setting newer than the checkpoint had its default
        moved = {k: [saved.get(k, defaults[k]), v] for k, v in dataclasses.asdict(self.config).items()
                 if k not in ("extra", "threads") and _plain(saved.get(k, defaults[k])) != _plain(v)}
        if moved:  # provenance: what a resumed run changed, and from which step (the export records it)
            self.config.extra.setdefault("changes", []).append({"step": state["step"], "changed": moved})
        if "scaling_factor" in self.config.extra:
            self.vae.register_to_config(scaling_factor=self.config.extra["scaling_factor"])
        for prefix, module in (("vae", self.vae), ("unet", self.unet), ("text_encoder", self.text_encoder)):
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        self.ema = [tensors[f"ema.{i}"] for i in range(len(self.ema))]
        optimizer_from_tensors(self.optimizer, tensors, state["optimizer"], "optimizer")
        optimizer_from_tensors(self.vae_optimizer, tensors, state["vae_optimizer"], "vae_optimizer")
        self.vae_step, self.step, self.seconds = state["vae_step"], state["step"], state["seconds"]

    def run(self) -> None:
        self.train_autoencoder()
        self.train_diffusion()


def command_line(config: ToyTrainConfig) -> str:
    """The command that trains with `config` (the settings that differ from the defaults)."""
    defaults, words = ToyTrainConfig(), ["python -m sae_utils.toyworld.train_model --out DIR"]
    for f in dataclasses.fields(ToyTrainConfig):
        value = getattr(config, f.name)
        if f.name in ("extra", "attention_prior_resolutions") or _plain(value) == _plain(getattr(defaults, f.name)):
            continue
        value = ",".join(map(str, value)) if isinstance(value, tuple | list) else value
        words.append(f"--{f.name.replace('_', '-')} {value}")
    return " ".join(words + ["--export FOLDER"])


def _save_grid(images: np.ndarray, path: Path, columns: int) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate((images * 255).round().astype(np.uint8)):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="training folder (checkpoint, samples, history)")
    parser.add_argument("--export", help="write the EMA model as a diffusers folder here when done")
    defaults = ToyTrainConfig()
    for f in dataclasses.fields(ToyTrainConfig):
        if f.name in ("extra", "unet_channels", "attention_prior_resolutions"):
            continue
        kind = type(getattr(defaults, f.name))
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=(lambda s: s.lower() in ("1", "true", "yes"))
                            if kind is bool else kind, default=getattr(defaults, f.name))
    parser.add_argument("--unet-channels", default=",".join(map(str, defaults.unet_channels)))
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyTrainConfig)
              if f.name not in ("extra", "unet_channels", "attention_prior_resolutions")}
    config = ToyTrainConfig(**values, unet_channels=tuple(int(c) for c in args.unet_channels.split(",")))
    if config.threads:
        torch.set_num_threads(config.threads)
    trainer = ToyTrainer(args.out, config)
    trainer.run()
    if args.export:
        print(f"exported to {trainer.export(args.export)}")


if __name__ == "__main__":
    main()
