"""A faithful re-implementation of the reference training step, to measure the project's step against.

What the public SepEn code does (it inherits Attend-and-Excite's attention machinery), described in
../shared/reference/sepen-facts.md and re-written here, not copied:
- every attention layer, self and cross, runs an eager processor: scores = baddbmm(Q, K^T), softmax,
  probabilities @ V, with the probabilities of all heads materialised;
- an attention store keeps every map whose query count is at most 32x32 (self- and cross-attention alike)
  for the whole forward, although the losses read only the 16x16 cross-attention maps;
- the store keeps `attn[n // 2:]` of every call (a rule for classifier-free-guidance batches), so the loss reads
  the second half of the training batch as per-head slices (`sae_utils.maps.released_head_stack`), each term a
  max over the slices: the released objective, which `FinetuneConfig(map_reading="released")` also computes;
- the UNet runs to the end in float32; the loss is computed from the stored maps;
- the norm loss of multi-concept training uses a second, frozen copy of the whole UNet, in a second update after
  the SepEn one (train_large.py).
The losses themselves are the same pure functions as the project's (sae_utils.losses).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sae_utils.losses import sepen_loss_terms_per_slice


class ReferenceStore:
    def __init__(self):
        self.maps: list[tuple[bool, torch.Tensor]] = []

    def __call__(self, probs: torch.Tensor, is_cross: bool) -> None:
        if probs.shape[1] <= 32 ** 2:  # the reference keeps every map up to 32x32 queries
            self.maps.append((is_cross, probs[probs.shape[0] // 2:]))  # AttentionControl: attn[h // 2:]

    def cross_maps(self, batch: int, resolution: int = 16) -> torch.Tensor:
        """(B, S, res, res, T): the kept cross-attention rows at `resolution` as aggregate_attention reshapes them
        (image i = rows i*S .. i*S+S-1 of the kept half), averaged over layers."""
        chosen = [p for is_cross, p in self.maps if is_cross and p.shape[1] == resolution ** 2]
        maps = torch.stack([p.reshape(batch, -1, resolution, resolution, p.shape[-1]) for p in chosen])
        return maps.mean(dim=0)


class ReferenceProcessor:
    """Eager attention that hands every probability tensor to the store (self-attention included)."""

    def __init__(self, store: ReferenceStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, L, T)
        self.store(probs, is_cross)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


class ReferenceTrainer:
    """The reference step on a UNet: K trainable, AdamW (foreach), clipping 1.0, optional frozen UNet copy."""

    def __init__(self, unet, learning_rate: float, norm_loss_weight: float = 0.0, autocast_dtype=None):
        self.unet, self.norm_loss_weight, self.autocast_dtype = unet, norm_loss_weight, autocast_dtype
        unet.requires_grad_(False)
        self.params = [p for n, p in unet.named_parameters() if "attn2.to_k" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.frozen = copy.deepcopy(unet).requires_grad_(False) if norm_loss_weight > 0 else None
        self.store = ReferenceStore()
        for model in filter(None, (unet, self.frozen)):
            model.set_attn_processor(ReferenceProcessor(self.store))
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=1e-2)

    def autocast(self, device_type: str):
        enabled = self.autocast_dtype is not None
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=enabled)

    def step(self, noisy, timesteps, text, token_indices, prior=None) -> float:
        """token_indices: (B, K) single-token object positions; prior: (noisy, timesteps, text) for the norm loss,
        trained in a second update as train_large.py does. Returns the SepEn loss."""
        batch = noisy.shape[0]
        self.store.maps.clear()
        with self.autocast(noisy.device.type):
            self.unet(noisy, timesteps, text)
            maps = self.store.cross_maps(batch).float()  # (B, S, 16, 16, T)
            objects = torch.stack([maps[i, ..., token_indices[i]] for i in range(batch)]).permute(0, 1, 4, 2, 3)
            loss = sepen_loss_terms_per_slice(objects).total.mean()  # (B, S, K, 16, 16)
        self._update(loss)
        if self.frozen is not None:
            p_noisy, p_t, p_text = prior
            with self.autocast(noisy.device.type):
                with torch.no_grad():
                    target = self.frozen(p_noisy, p_t, p_text).sample
                prediction = self.unet(p_noisy, p_t, p_text).sample
                self._update(self.norm_loss_weight * F.mse_loss(prediction.float(), target.float()))
        self.store.maps.clear()
        return loss.item()

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
