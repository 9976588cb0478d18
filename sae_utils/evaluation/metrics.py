"""Every per-image metric of one prompt's images in one call, as records that `summarise` turns into a table.

    models = load_metric_models(device="cuda")
    records = evaluate_images(images, "a cat and a dog", ["cat", "dog"], models, method="sepen")
    summarise(records, by=["method"], unit="prompt")

A metric runs when its model is loaded (a MetricModels field left None skips it). Record keys: prompt, image
(index), clip_full, clip_min_object (CLIP), blip_similarity, caption (BLIP + CLIP), objects_found (fraction of the
prompt's objects found), success (all found) and the threshold used (detector); plus any `extra` keys.
"""
from __future__ import annotations

from typing import Sequence

from sae_utils.evaluation.blip import blip_text_similarity
from sae_utils.evaluation.clip_score import clip_scores
from sae_utils.evaluation.detection import DEFAULT_THRESHOLD, detect_objects, detection_success
from sae_utils.evaluation.images import ImageInput, to_pil_images
from sae_utils.evaluation.loading import MetricModels


def evaluate_images(images: ImageInput, prompt: str, words: Sequence[str], models: MetricModels,
                    threshold: float = DEFAULT_THRESHOLD, batch_size: int = 16, **extra) -> list[dict]:
    """One record per image with every metric whose model is loaded; `extra` (e.g. method="sepen",
    category="animals") is copied into each record."""
    images = to_pil_images(images)
    records = [dict(extra, prompt=prompt, image=i) for i in range(len(images))]
    if models.clip is not None:
        scores = clip_scores(images, prompt, words, models.clip, models.clip_processor, batch_size=batch_size)
        for record, full, worst in zip(records, scores["full"].tolist(), scores["min_object"].tolist()):
            record.update(clip_full=full, clip_min_object=worst)
    if models.blip is not None:
        if models.clip is None:
            raise ValueError("The BLIP score compares captions with the prompt in CLIP: load CLIP too.")
        blip = blip_text_similarity(images, prompt, models.blip, models.blip_processor, models.clip,
                                    models.clip_processor, batch_size=batch_size)
        for record, similarity, caption in zip(records, blip["similarity"].tolist(), blip["captions"]):
            record.update(blip_similarity=similarity, caption=caption)
    if models.detector is not None:
        _, present = detect_objects(images, words, models.detector, models.detector_processor, threshold,
                                    batch_size=batch_size)
        for record, found, success in zip(records, present.float().mean(1).tolist(),
                                          detection_success(present).tolist()):
            record.update(objects_found=found, success=success, threshold=threshold)
    return records
