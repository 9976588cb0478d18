"""The toy study's code paths on a micro toy model (2 training steps: its numbers mean nothing)."""
import numpy as np
import pytest
import torch

from sae_utils.models import load_pipeline
from sae_utils.toyworld.study import StudySettings, ToyStudy, eval_set, rate, report_table, sample, score
from sae_utils.toyworld.train_model import ToyTrainConfig, ToyTrainer
from sae_utils.toyworld.world import CONTROL_PAIRS, SEEN_PAIRS, TARGET_PAIRS, make_rng, render_batch, sample_scene


@pytest.fixture(scope="module")
def micro_toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    trainer = ToyTrainer(folder / "train", ToyTrainConfig(vae_steps=2, vae_batch=4, steps=2, batch=4, eval_every=0,
                                                          unet_channels=(32, 32, 32)))
    trainer.run()
    return load_pipeline(trainer.export(folder / "model"), device="cpu")


def test_images_depend_on_prompt_and_seed_not_on_the_batch(micro_toy):
    kinds, seeds = eval_set("target", 4)
    whole = sample(micro_toy, kinds, seeds, batch_size=16, num_inference_steps=2)
    pieces = sample(micro_toy, kinds, seeds, batch_size=3, num_inference_steps=2)
    # identical up to float rounding across batch sizes: at most one grey level, in very few pixels
    difference = np.abs(whole.images.astype(int) - pieces.images.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    torch.testing.assert_close(whole.word_maps, pieces.word_maps, atol=1e-6, rtol=0)
    assert whole.word_maps.shape == (16, 2, 8, 8)  # the toy's map level


def test_score_counts_what_the_evaluator_sees():
    rng = make_rng(5)
    both = [sample_scene(rng, ["star", "heart"]) for _ in range(6)]
    one = [sample_scene(rng, ["star"]) for _ in range(6)]
    from sae_utils.toyworld.study import Samples

    samples = Samples([["star", "heart"]] * 12, list(range(12)), render_batch(both + one), None)
    result = score(samples)
    assert result["all_present"]["rate"] == 0.5 and result["first_present"]["rate"] == 1.0
    assert result["only_one"]["n"] == 12 and result["all_present"]["low"] < 0.5 < result["all_present"]["high"]
    assert rate(np.array([True] * 3 + [False]))["rate"] == 0.75


def test_a_single_pair_condition_restores_the_base_model(micro_toy):
    settings = StudySettings(single_per_kind=8, pair_per_prompt=1, control_per_prompt=4, batch_size=16,
                             sampling=dict(num_inference_steps=2), finetune=dict(steps=2, learning_rate=1e-3))
    study = ToyStudy(micro_toy, settings, progress=False)
    before = {n: p.clone() for n, p in micro_toy.unet.named_parameters()}
    condition = study.single_pair("sepen")
    assert all(torch.equal(p, before[n]) for n, p in micro_toy.unet.named_parameters())
    assert condition["target"]["all_present"]["n"] == len(TARGET_PAIRS)
    assert condition["single"]["all_present"]["n"] == 4 * 2 * 8  # every delta is checked on all 8 kinds, 2 seeds each
    assert condition["single_base"]["n"] == 2 * 8  # ... and compared with the base on the same seeds
    assert condition["control"]["all_present"]["n"] == 4 * len(CONTROL_PAIRS) and condition["control_base"]["n"] == 4
    fake = {"rate": 0.987, "low": 0.9, "high": 1.0, "n": 99}  # no multiple of 1/8: cannot equal the same-seed base
    study.results["conditions"]["base"] = {"single": {"all_present": fake}}
    expected = condition["single"]["all_present"]["rate"] - condition["single_base"]["rate"]
    row = next(line for line in report_table(study.results).splitlines() if line.startswith("| sepen |"))
    assert f"{100 * expected:+.1f} [" in row  # against the base on the same seeds, not the base's own 99 images


def test_the_demo_writes_its_report(micro_toy, tmp_path):
    from sae_utils.demo import main

    main(["--model", str(micro_toy.name_or_path), "--out", str(tmp_path), "--images-per-pair", "1", "--images-per-kind",
          "1", "--steps", "2", "--num-inference-steps", "2"])
    report = (tmp_path / "report.md").read_text()
    assert "| base |" in report and "| SepEn (K) |" in report and "target pairs" in report
    results = __import__("json").loads((tmp_path / "results.json").read_text())
    assert set(results["differences"]) == {"single", "target", "control"}
    assert {"rates.png", "target_pairs.png", "attention.png"} <= {p.name for p in tmp_path.iterdir()}


def test_base_rates_are_measured_on_fixed_seeds_and_stored_in_the_model_folder(micro_toy, tmp_path):
    import json
    import shutil

    from sae_utils.toyworld.base_rates import measure_base_rates, table, write_base_rates

    settings = StudySettings(single_per_kind=1, pair_per_prompt=1, seen_per_prompt=1,
                             sampling=dict(num_inference_steps=2))
    rates = measure_base_rates(micro_toy, settings, progress=False)
    again = measure_base_rates(micro_toy, settings, progress=False)
    assert {w: rates[w]["all_present"] for w in ("single", "seen", "target", "control")} == \
           {w: again[w]["all_present"] for w in ("single", "seen", "target", "control")}
    assert rates["single"]["all_present"]["n"] == 8 and rates["seen"]["all_present"]["n"] == len(SEEN_PAIRS)
    assert rates["protocol"]["command"].startswith("python -m sae_utils.toyworld.base_rates")
    folder = shutil.copytree(micro_toy.name_or_path, tmp_path / "model")
    write_base_rates(folder, rates)
    assert json.loads((folder / "toy_model.json").read_text())["base_rates"]["target"] == rates["target"]
    assert "| target pairs |" in table(rates)
    with pytest.raises(FileNotFoundError, match="toy model folder"):
        write_base_rates(tmp_path, rates)


def test_the_full_protocol_writes_its_report_with_every_condition(micro_toy, tmp_path):
    from sae_utils.toyworld.study import run_study

    settings = StudySettings(single_per_kind=8, pair_per_prompt=1, control_per_prompt=4, seen_per_prompt=1,
                             batch_size=32, sampling=dict(num_inference_steps=2),
                             finetune=dict(steps=1, learning_rate=1e-3),
                             multi_pair=dict(steps=1, learning_rate=1e-3, norm_loss_weight=0.5))
    report = run_study(micro_toy, settings, tmp_path, ablation={"enhance only": dict(lambda_sep=0.0)}, progress=False)
    text = report.read_text()
    assert text.startswith("# Separate-and-Enhance on the toy model: a partial run (images per shape")  # tiny sizes
    assert "some conditions only" in text.splitlines()[0]
    for name in ("base", "sepen (K)", "sepen multi-pair (K, norm loss)", "enhance only"):
        assert f"| {name} |" in text
    results = __import__("json").loads((tmp_path / "results.json").read_text())
    assert results["protocol"]["command"].startswith("python -m sae_utils.toyworld.study")
    assert results["conditions"]["enhance only"]["finetune"]["lambda_sep"] == 0.0
    multi = results["conditions"]["sepen multi-pair (K, norm loss)"]
    assert multi["target"]["all_present"]["n"] == len(TARGET_PAIRS) and multi["seen"]["all_present"]["n"] == 20


def test_a_rerun_of_the_study_keeps_what_was_measured_and_measures_only_the_rest(micro_toy, tmp_path):
    import json

    from sae_utils.toyworld.study import run_study

    settings = StudySettings(single_per_kind=8, pair_per_prompt=1, seen_per_prompt=1, batch_size=32,
                             sampling=dict(num_inference_steps=2), finetune=dict(steps=1, learning_rate=1e-3),
                             multi_pair=dict(steps=1, learning_rate=1e-3, norm_loss_weight=0.5))
    run_study(micro_toy, settings, tmp_path, ablation={}, progress=False)
    first = json.loads((tmp_path / "results.json").read_text())
    first["conditions"]["sepen (K)"]["marker"] = "kept"  # a condition that is not measured again keeps this
    (tmp_path / "results.json").write_text(json.dumps(first))
    run_study(micro_toy, settings, tmp_path, ablation={"enhance only": dict(lambda_sep=0.0)}, progress=False)
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["conditions"]["sepen (K)"]["marker"] == "kept" and "single_base" in second["conditions"]["sepen (K)"]
    assert "enhance only" in second["conditions"] and "| enhance only |" in (tmp_path / "report.md").read_text()
    other = StudySettings(**{**settings.__dict__, "pair_per_prompt": 2})
    with pytest.raises(ValueError, match="other settings"):
        run_study(micro_toy, other, tmp_path, ablation={}, progress=False)


def test_the_study_command_refuses_an_unknown_condition_before_loading_the_model(capsys):
    from sae_utils.toyworld.study import main

    with pytest.raises(SystemExit):
        main(["--out", "unused", "--model", "no-such-folder", "--conditions", "sepen (K), released map reading", "typo"])
    err = capsys.readouterr().err
    assert "unknown condition(s) ['typo']" in err and "sepen (K), released template" in err


def test_only_the_committed_protocol_is_called_the_full_protocol():
    from sae_utils.toyworld.study import protocol_title

    assert protocol_title(StudySettings(), None, None) == "the full protocol"
    quick = protocol_title(StudySettings(single_per_kind=8, pair_per_prompt=8, control_per_prompt=8,
                                         seen_per_prompt=4), None, None)
    assert quick == ("a partial run (images per shape / target pair / control pair / seen pair 8/8/8/4 "
                     "(the full protocol: 32/64/32/12))")
    assert protocol_title(StudySettings(), {}, ["sepen multi-pair (K, norm loss)"]).endswith("some conditions only)")
    other = StudySettings()
    other.finetune = {**other.finetune, "learning_rate": 1e-4}
    assert "other sampling or finetuning settings" in protocol_title(other, None, None)


def test_the_report_names_a_model_inside_the_working_directory_by_its_relative_path(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sae_utils.toyworld.study import display_name

    monkeypatch.chdir(tmp_path)
    assert display_name(SimpleNamespace(name_or_path=str(tmp_path / "models" / "toy"))) == "models/toy"
    assert display_name(SimpleNamespace(name_or_path="/elsewhere/toy")) == "/elsewhere/toy"
    assert display_name(SimpleNamespace(name_or_path="toy")) == "toy"
