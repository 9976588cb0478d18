"""`python -m sae_utils generate` and `... evaluate`, called through the module's `main` (the same dispatch as the
command line, without paying a fresh interpreter's imports for each call)."""
import json

import pandas as pd
import pytest

from sae_utils.cli import main
from sae_utils.sampling import read_metadata



def test_generate_then_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["generate", "--model", "tiny", "--prompts", "a photo of a star and a heart", "a cat and a dog",
            "--seeds", "0", "1", "--num-inference-steps", "2", "--height", "32", "--width", "32",
            "--output-dir", str(run), "--capture-attention", "--no-progress", "--device", "cpu"]
    main(argv)
    assert "4 images generated, 0 already there" in capsys.readouterr().out
    records = read_metadata(run)
    assert sorted((r["prompt"], r["seed"]) for r in records) == [
        ("a cat and a dog", 0), ("a cat and a dog", 1), ("a photo of a star and a heart", 0),
        ("a photo of a star and a heart", 1)]
    assert all(r["sampler"]["num_inference_steps"] == 2 and "attention" in r for r in records)
    main(argv)
    assert "0 images generated, 4 already there" in capsys.readouterr().out
    # the toy metric knows shapes only: cat and dog are refused with the fix
    with pytest.raises(SystemExit, match="toy-world prompts only"):
        main(["evaluate", str(run), "--metrics", "toy"])


def test_evaluate_reports_numbers_on_tiny_noise(tmp_path, capsys):
    runs = []
    for label in ("first", "second"):
        runs.append(tmp_path / label)
        main(["generate", "--model", "tiny", "--prompts", "a photo of a star and a heart", "--seeds", "0", "1",
              "--num-inference-steps", "2", "--height", "32", "--width", "32", "--output-dir", str(runs[-1]),
              "--label", label, "--no-progress", "--device", "cpu"])
    capsys.readouterr()
    main(["evaluate", *map(str, runs), "--metrics", "toy", "--n-boot", "100", "--compare-dir", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "first | all | n=2 images, 1 prompts | toy_both_present" in out and "== comparison" in out
    scores = pd.read_csv(runs[0] / "scores.csv")
    assert len(scores) == 2 and scores["toy_objects_found"].between(0, 1).all()
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())["rows"]
    assert {row["label"] for row in summary} == {"first", "second"}
    assert all(0 <= row["toy_both_present"] <= 1 for row in summary)
    assert (tmp_path / "cmp" / "figures" / "grid_a_photo_of_a_star_and_a_heart.png").is_file()


def test_usage_lists_the_commands(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "finetune,generate,evaluate" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="Unknown metrics"):
        main(["evaluate", "somewhere", "--metrics", "fid"])
    with pytest.raises(SystemExit, match="somewhere holds no metadata.jsonl"):  # checked before models load
        main(["evaluate", "somewhere", "--metrics", "clip"])
    # conftest switches the hub off: weights that are not here fail at once, saying how to get them
    from PIL import Image

    from sae_utils.sampling import append_records

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    append_records(tmp_path / "metadata.jsonl", [{"prompt": "a cat and a dog", "words": ["cat", "dog"], "seed": 0,
                                                  "method": "sd", "image": "0.png"}])
    with pytest.raises(SystemExit, match="hf download openai/clip-vit-base-patch16"):
        main(["evaluate", str(tmp_path), "--metrics", "clip"])
