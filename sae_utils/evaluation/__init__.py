"""Image-text metrics of the SepEn evaluation: CLIP scores, BLIP caption similarity, detection success, FID.

    models = load_metric_models(device="cuda")          # CLIP ViT-B/16, BLIP base (COCO), OWLv2
    records = evaluate_images(images, "a cat and a dog", ["cat", "dog"], models, method="sd14")
    summarise(records, by=["method"], unit="prompt")    # means with 95 % bootstrap intervals

One file per idea: loading (names -> models, fast failure offline), subprompts (object sub-prompts, CLIP's
template ensemble), clip_score, blip, detection, fid, stats (bootstrap intervals, tables), metrics (all of them
for one prompt's images).

What is checked here, and what is not. The tests run every function on tiny random-weight models of the same
transformers classes (CLIPModel, BlipForConditionalGeneration, Owlv2ForObjectDetection), built offline, and
check the arithmetic (cosines against the models' own embeddings, sub-prompt splits, thresholds, intervals).
Not verified here, because no machine here can download weights:
- the real checkpoints were never loaded, so the scores were never compared with Attend-and-Excite's or the
  paper's numbers (CLIP and BLIP follow Attend-and-Excite's code, which uses openai `clip` and LAVIS; here the
  transformers ports of the same checkpoints run, and their preprocessing is meant to match, unchecked);
- the detector is OWLv2, not the paper's Detic, and its threshold (0.1) is not calibrated on real images: the
  success rates are not comparable with the paper's until it is;
- FID needs clean-fid (not installed here); only the Fréchet distance formula is tested.
"""
from sae_utils.evaluation.blip import blip_captions, blip_text_similarity
from sae_utils.evaluation.clip_score import (clip_image_text_similarity, clip_scores, image_embeddings,
                                             text_embeddings, text_text_similarity)
from sae_utils.evaluation.detection import (DEFAULT_THRESHOLD, box_scores_to_object_scores, detect_objects,
                                            detection_scores, detection_success, objects_present)
from sae_utils.evaluation.fid import feature_statistics, fid, frechet_distance
from sae_utils.evaluation.images import to_pil_images
from sae_utils.evaluation.loading import (DEFAULT_BLIP, DEFAULT_CLIP, DEFAULT_DETECTOR, MetricModelNotAvailable,
                                          MetricModels, load_blip, load_clip, load_detector, load_metric_models)
from sae_utils.evaluation.metrics import evaluate_images
from sae_utils.evaluation.stats import bootstrap_ci, summarise, wilson_interval
from sae_utils.evaluation.subprompts import IMAGENET_TEMPLATES, ensemble_texts, object_subprompts

__all__ = [
    "blip_captions",
    "blip_text_similarity",
    "clip_image_text_similarity",
    "clip_scores",
    "image_embeddings",
    "text_embeddings",
    "text_text_similarity",
    "DEFAULT_THRESHOLD",
    "box_scores_to_object_scores",
    "detect_objects",
    "detection_scores",
    "detection_success",
    "objects_present",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "to_pil_images",
    "DEFAULT_BLIP",
    "DEFAULT_CLIP",
    "DEFAULT_DETECTOR",
    "MetricModelNotAvailable",
    "MetricModels",
    "load_blip",
    "load_clip",
    "load_detector",
    "load_metric_models",
    "evaluate_images",
    "bootstrap_ci",
    "summarise",
    "wilson_interval",
    "IMAGENET_TEMPLATES",
    "ensemble_texts",
    "object_subprompts",
]
