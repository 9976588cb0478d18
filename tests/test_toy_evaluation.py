"""The evaluation pipeline (generate -> score_run) on the shipped toy model agrees with the toy study, image for
image, and every method runs on it: the toy world is where the evaluation code is checked against exact answers."""
import pytest

from sae_utils import results
from sae_utils.models import load_pipeline
from sae_utils.sampling import GenerationConfig, generate
from sae_utils.toyworld import objects_present, prompt_for
from sae_utils.toyworld.study import EVAL_SEED, eval_set, sample, score

PAIRS = [("star", "heart"), ("circle", "triangle")]
SEEDS = [EVAL_SEED + i for i in range(4)]


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def test_generate_and_score_run_reproduce_the_toy_study(toy, tmp_path):
    config = GenerationConfig(model="toy", prompts=[prompt_for(p) for p in PAIRS], seeds=SEEDS,
                              output_dir=str(tmp_path), capture_attention=True, device="cpu")
    generate(config, pipe=toy)
    scores = results.score_run(tmp_path, ["toy"])
    study = sample(toy, *eval_set("pairs", len(SEEDS), pairs=PAIRS), batch_size=8)
    expected = objects_present(study.images, study.kinds).all(dim=1).tolist()
    # same prompts, same seeds, same sampler: the same verdict for every image, hence the same rate
    by_image = scores.set_index(["prompt", "seed"])["toy_both_present"]
    assert [bool(by_image[(prompt_for(k), s)]) for k, s in zip(study.kinds, study.seeds)] == expected
    assert scores["toy_both_present"].mean() == score(study)["all_present"]["rate"]
    # and the attention statistics that generation records are the study's maps
    peaks = scores.groupby("prompt")["attn_peak_min"].mean()
    assert peaks.notna().all() and (peaks > 0).all()


@pytest.mark.parametrize("method", ["attend-and-excite", "sepen-test-time"])
def test_the_test_time_methods_run_on_the_toy_model(toy, tmp_path, method):
    config = GenerationConfig(model="toy", method=method, prompts=[prompt_for(PAIRS[0])], seeds=SEEDS[:2],
                              output_dir=str(tmp_path), capture_attention=True, device="cpu")
    summary = generate(config, pipe=toy)
    assert summary.generated == 2
    scores = results.score_run(tmp_path, ["toy"])
    assert len(scores) == 2 and set(scores["toy_both_present"].unique()) <= {0.0, 1.0}
