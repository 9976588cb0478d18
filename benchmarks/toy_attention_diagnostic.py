"""Does the toy model's cross-attention predict which object goes missing? (the premise of Separate-and-Enhance)

    python benchmarks/toy_attention_diagnostic.py      # about 2 minutes on 2 CPU cores

On the base model's 256 held-out-pair images of the toy study (same seeds), compares the attention statistics of
images that show both shapes with those that miss one: the weaker word's peak (Enhance's premise: a missing
object had a weak peak) and the overlap of the two maps (Separate's premise). AUC: the chance that an image with
both shapes scores better than one without (0.5 = no information). Writes
benchmarks/results/toy_study/attention_diagnostic.json.
"""
import json
import platform
from pathlib import Path

import numpy as np
import torch

from sae_utils.models import load_pipeline
from sae_utils.toyworld.study import sample, eval_set
from sae_utils.toyworld.evaluator import objects_present
from sae_utils.maps import overlap, peak_activation
pipe = load_pipeline("toy", device="cpu")
s = sample(pipe, *eval_set("held_out", 32), batch_size=64)
present = objects_present(s.images, s.kinds).numpy()
both = present.all(1)
maps = s.word_maps.float()
peaks = peak_activation(maps).numpy()
ov = overlap(maps).numpy()
weak = peaks.min(1)
def auc(score, label):  # P(score of a success > score of a failure)
    pos, neg = score[label], score[~label]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
# per object: is the missing object the one with the lower peak?
missing_one = present.sum(1) == 1
lower = peaks.argmin(1)
missing_idx = np.where(present[:, 0], 1, 0)
agree = float((lower[missing_one] == missing_idx[missing_one]).mean())
result = ({"n": int(len(both)), "both_rate": float(both.mean()),
  "weaker_peak_both": float(weak[both].mean()), "weaker_peak_not": float(weak[~both].mean()),
  "overlap_both": float(ov[both].mean()), "overlap_not": float(ov[~both].mean()),
  "auc_weaker_peak": auc(weak, both), "auc_minus_overlap": auc(-ov, both),
  "one_missing": int(missing_one.sum()), "missing_is_lower_peak": agree,
          "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"})
out = Path(__file__).parent / "results" / "toy_study" / "attention_diagnostic.json"
out.write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
