"""Detection success: an open-vocabulary detector must find every object of the prompt.

    scores, present = detect_objects(images, ["cat", "dog"], owl, owl_processor)   # (N, K), (N, K) bool
    detection_success(present)                                                     # (N,) bool: all found

The paper uses Detic with a confidence threshold of 0.3. Detic is not available in transformers; this module
uses OWLv2 (or OWL-ViT) through transformers instead, queried with "a photo of a {word}". An object's score is
the highest sigmoid class score for its query over all predicted boxes (a box may count for several objects).

About the threshold: OWLv2's scores are calibrated differently from Detic's, so the paper's 0.3 does not carry
over. The default here is 0.1, the default of transformers' OWLv2 post-processing and the value of the text-query
example in `Owlv2ForObjectDetection.forward`'s docstring. It was not calibrated on real images here: calibrate it
on a few dozen labelled generated images (e.g. the value that best separates images with and without the object)
and report the threshold with the success rate.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sae_utils.evaluation.images import ImageInput, batches, to_pil_images

DEFAULT_THRESHOLD = 0.1
QUERY_TEMPLATE = "a photo of a {}"


@torch.no_grad()
def detection_scores(images: ImageInput, words: Sequence[str], model, processor, batch_size: int = 8,
                     query_template: str = QUERY_TEMPLATE) -> torch.Tensor:
    """Max over boxes of each word's detection score: (N, K) float32 in [0, 1] on the CPU."""
    if isinstance(words, str) or not words:
        raise ValueError(f"words must be a non-empty list of object words, e.g. ['cat', 'dog']; got {words!r}.")
    queries = [query_template.format(w) for w in words]
    out = []
    for batch in batches(to_pil_images(images), batch_size):
        inputs = processor(text=[queries] * len(batch), images=list(batch), return_tensors="pt")
        outputs = model(input_ids=inputs["input_ids"].to(model.device),
                        attention_mask=inputs["attention_mask"].to(model.device),
                        pixel_values=inputs["pixel_values"].to(model.device, model.dtype))
        out.append(box_scores_to_object_scores(outputs.logits.float().cpu()))
    return torch.cat(out)


def box_scores_to_object_scores(logits: torch.Tensor) -> torch.Tensor:
    """logits: (N, boxes, K) class logits -> (N, K) highest sigmoid score of each object over the boxes."""
    if logits.ndim != 3:
        raise ValueError(f"Expected logits (N, boxes, K); got shape {tuple(logits.shape)}.")
    return logits.sigmoid().amax(dim=1)


def objects_present(scores: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """scores: (N, K) -> (N, K) bool: an object is found when its score is above the threshold (`>`, as
    transformers' post-processing keeps boxes)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a detection score in [0, 1]; got {threshold}.")
    return scores > threshold


def detection_success(present: torch.Tensor) -> torch.Tensor:
    """present: (N, K) bool -> (N,) bool, True when every object of the image was found."""
    if present.dtype != torch.bool or present.ndim != 2:
        raise ValueError(f"Expected a (N, K) bool tensor (objects_present's output); got {present.dtype} "
                         f"{tuple(present.shape)}.")
    return present.all(dim=1)


def detect_objects(images: ImageInput, words: Sequence[str], model, processor,
                   threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8,
                   query_template: str = QUERY_TEMPLATE) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (N, K), present (N, K) bool) for the objects `words` in each image. See the module's note on
    the threshold."""
    scores = detection_scores(images, words, model, processor, batch_size, query_template)
    return scores, objects_present(scores, threshold)
