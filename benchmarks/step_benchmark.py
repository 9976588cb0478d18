"""Measure the project's SepEn training step against the reference approach, in one process.

    python benchmarks/step_benchmark.py --out benchmarks/results/gpu      # on a GPU: SD v1 architecture
    python benchmarks/step_benchmark.py --smoke --out /tmp/smoke          # CPU smoke run on `tiny` (CI)

Writes `benchmark.json` (device, versions, every measurement) and `benchmark.md` (the tables). The SD v1
weights are random unless --model names a real checkpoint: step time and memory depend on the architecture,
not the weights. Sections:
1. the training step, reference vs project, adding the project's techniques one at a time, for single-pair
   training and for multi-concept training with the norm loss (ratios against the published reference);
2. the Colab T4 budget: the default settings under a 15 GiB cap, and the low-memory preset under 8 GiB;
3. sampling with attention capture against plain sampling (50 steps, batch 8);
4. the CUDA-graph step against the eager step (same losses and weights);
5. a whole 200-step single-pair run, eager and as a CUDA graph.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_step import ReferenceTrainer  # noqa: E402

from sae_utils.attention import capture_cross_attention  # noqa: E402
from sae_utils.finetune import FinetuneConfig, Finetuner, preset  # noqa: E402
from sae_utils.models import load_pipeline, sd_v1_pipeline, tiny_pipeline  # noqa: E402
from sae_utils.prompts import multi_concept_split, prior_prompt  # noqa: E402
from sae_utils.tokens import token_positions  # noqa: E402

GIB = 2**30
VARIANTS = [  # (name, kind, settings): each row adds one technique to the row above it
    ("reference, fp32 (as published)", "reference", {}),
    ("reference, bf16 autocast", "reference", {"autocast": torch.bfloat16}),
    # the same objective as the reference rows: the released reading (per-head slices of half the batch)
    ("project, released reading: 16x16 capture only, SDPA elsewhere, fp32", "project",
     {"mixed_precision": "no", "early_exit": False, "map_reading": "released"}),
    ("project: 16x16 capture only, SDPA elsewhere, fp32", "project", {"mixed_precision": "no", "early_exit": False}),
    ("+ stop the forward after the last 16x16 layer", "project", {"mixed_precision": "no"}),
    ("+ bf16 weights and autocast", "project", {"mixed_precision": "bf16"}),
    ("+ fused AdamW", "project", {"mixed_precision": "bf16", "optimizer": "adamw-fused"}),
    ("+ the whole step as one CUDA graph", "project",
     {"mixed_precision": "bf16", "optimizer": "adamw-fused", "compile": "cuda-graph"}),
]
GPU_ONLY = ("adamw-fused", "cuda-graph")


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.batch = 2 if args.smoke else 4  # smoke: every code path at half the work (batch 1 would hide batching)

    # -- helpers ---------------------------------------------------------------------------------------------
    def pipeline(self, dtype=torch.float32):
        if self.args.smoke:
            return tiny_pipeline().to(self.device, dtype)
        if self.args.model:
            return load_pipeline(self.args.model, device=self.device, dtype=dtype, safety_checker=False)
        return sd_v1_pipeline(self.device, dtype)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def clear(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def timed(self, step, warmup: int, repeat: int) -> dict:
        """Times `repeat` calls of `step` after `warmup` untimed ones; "output" is what the last call returned."""
        for _ in range(warmup):
            step()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            output = step()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / GIB if self.cuda else None
        return {"median_s": statistics.median(times), "min_s": min(times), "peak_gib": peak, "repeat": repeat,
                "output": output}

    def finetune_config(self, multi: bool, **settings) -> FinetuneConfig:
        base = dict(model="benchmark", device=str(self.device), steps=10**6, batch_size=self.batch, seed=0)
        if self.args.smoke:
            base["device"] = "cpu"
        if multi:
            concepts = multi_concept_split()["seen"]
            base |= dict(concepts=concepts, connectors=("and", "with"), shuffle_order=True, norm_loss_weight=0.5)
        else:
            base |= dict(pairs=[("cat", "dog")])
        return FinetuneConfig(**(base | settings))

    # -- 1. the training step --------------------------------------------------------------------------------
    def step_table(self) -> list[dict]:
        rows = []
        # smoke: one timed step per row runs the row's code path (CPU timings of `tiny` mean nothing, and bf16 on
        # a CPU without native bf16 is slow: each extra smoke step cost CI seconds)
        warmup, repeat = (0, 1) if self.args.smoke else (3, 10)
        for multi in (False, True):
            for name, kind, settings in VARIANTS:
                if not self.cuda and any(v in GPU_ONLY for v in settings.values()):
                    continue
                self.clear()
                try:
                    result = (self.reference(multi, settings) if kind == "reference"
                              else self.project(multi, settings))(warmup, repeat)
                except Exception as error:  # noqa: BLE001 - one failing row must not cost the table
                    result = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                reading = "released" if kind == "reference" else settings.get("map_reading", "head-mean")
                rows.append({"configuration": "multi-concept + norm loss" if multi else "single pair",
                             "variant": name, "map_reading": reading,
                             "norm_update": ("separate" if reading == "released" else "joint") if multi else None,
                             **result})
                print(json.dumps(rows[-1]), flush=True)
        return rows

    def project(self, multi, settings):
        dtype = torch.bfloat16 if settings.get("mixed_precision") == "bf16" else torch.float32
        if multi and settings.get("map_reading") == "released":
            settings = {**settings, "norm_update": "separate"}  # the reference's second update, the same work
        finetuner = Finetuner(self.finetune_config(multi, **settings), pipeline=self.pipeline(dtype), resume=False)

        def run(warmup, repeat):
            with finetuner.capturing():  # as in Finetuner.train: processors installed once for the loop
                result = self.timed(finetuner.train_step, warmup, repeat)
            result["loss"] = result.pop("output")["loss"]  # the last timed step's
            return result
        return run

    def reference(self, multi, settings):
        pipe = self.pipeline(torch.float32)
        data = Finetuner(self.finetune_config(multi, mixed_precision="no"), pipeline=pipe, resume=False)
        trainer = ReferenceTrainer(pipe.unet, data.learning_rate, 0.5 if multi else 0.0, settings.get("autocast"))
        state = {"step": 0}

        def step():
            samples = data.sampler.batch(0, state["step"], 0, self.batch)
            noisy, timesteps = data.random_inputs(state["step"], 0, self.batch)
            text = data.text_embeddings([s.prompt for s in samples])
            indices = torch.tensor([[token_positions(pipe.tokenizer, s.prompt, w)[0] for w in s.words] for s in samples])
            prior = None
            if multi:
                prompts = [prior_prompt(s.words[0]).prompt for s in samples]
                p_noisy, p_t = data.random_inputs(state["step"], 0, self.batch, stream=1)
                prior = (p_noisy, p_t, data.text_embeddings(prompts))
            state["step"] += 1
            return trainer.step(noisy, timesteps, text, indices, prior)

        def run(warmup, repeat):
            result = self.timed(step, warmup, repeat)
            result["loss"] = result.pop("output")  # the last timed step's
            return result
        return run

    # -- 2. the Colab T4 budget ------------------------------------------------------------------------------
    def memory_budget(self) -> list[dict]:
        if not self.cuda:
            return [{"skipped": "no CUDA device: the memory cap needs a GPU"}]
        total = torch.cuda.get_device_properties(0).total_memory
        rows = []
        for cap_gib, preset_name in ((15, "colab-t4"), (8, "colab-t4"), (8, "low-memory")):
            self.clear()
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
            row = {"cap_gib": cap_gib, "preset": preset_name}
            try:
                config = preset(preset_name, model="benchmark", pairs=[("cat", "dog")], steps=10**6, device="cuda")
                finetuner = Finetuner(config, pipeline=self.pipeline(torch.float16), resume=False)
                with finetuner.capturing():
                    result = self.timed(finetuner.train_step, 2, 5)
                    loss = result.pop("output")["loss"]
                    row |= {"fits": True, **result, "loss": loss}
                del finetuner
            except torch.OutOfMemoryError as error:
                row |= {"fits": False, "error": str(error)[:160]}
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
            rows.append(row)
            print(json.dumps(row), flush=True)
        return rows

    # -- 3. sampling with capture ----------------------------------------------------------------------------
    def sampling(self) -> dict:
        self.clear()
        dtype = torch.float16 if self.cuda else torch.float32
        pipe = self.pipeline(dtype)
        steps, batch = (2, 2) if self.args.smoke else (50, 8)
        prompts = ["a photo of a cat and a dog"] * batch

        def plain():
            pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))

        def captured():
            with capture_cross_attention(pipe) as store:
                plain()
            store.word_maps(prompts[0], ["cat", "dog"])

        warmup, repeat = (0, 1) if self.args.smoke else (1, 2)  # warm-up: once each path
        results = {"plain": self.timed(plain, warmup, repeat), "captured": self.timed(captured, warmup, repeat)}
        for r in results.values():
            r.pop("output")
            r["images_per_s"] = batch / r["median_s"]
        results["capture_overhead"] = results["captured"]["median_s"] / results["plain"]["median_s"] - 1
        results["settings"] = {"num_inference_steps": steps, "batch": batch, "dtype": str(dtype)}
        print(json.dumps(results), flush=True)
        return results

    # -- 4. the CUDA graph computes what the eager step computes ---------------------------------------------
    def graph_equivalence(self) -> dict:
        if not self.cuda:
            return {"skipped": "CUDA graphs need a GPU"}
        runs = {}
        for mode in ("none", "cuda-graph"):
            self.clear()
            config = self.finetune_config(False, mixed_precision="bf16", compile=mode, steps=10**6)
            finetuner = Finetuner(config, pipeline=self.pipeline(torch.bfloat16), resume=False)
            with finetuner.capturing():
                losses = [finetuner.train_step()["loss"] for _ in range(8)]
            runs[mode] = (losses, [p.detach().float().clone() for p in finetuner.parameters])
            del finetuner
        (eager_losses, eager), (graph_losses, graph) = runs["none"], runs["cuda-graph"]
        change = max((e - o).abs().max().item() for e, o in zip(eager, self._initial_keys()))
        row = {"steps": 8, "eager_losses": eager_losses, "graph_losses": graph_losses,
               "max_loss_difference": max(abs(a - b) for a, b in zip(eager_losses, graph_losses)),
               "max_weight_difference": max((e - g).abs().max().item() for e, g in zip(eager, graph)),
               "max_weight_change_in_training": change}
        print(json.dumps(row), flush=True)
        return row

    def _initial_keys(self):
        pipe = self.pipeline(torch.float32)
        return [p.detach().float().clone() for n, p in pipe.unet.named_parameters() if "attn2.to_k" in n]

    # -- 5. a whole run --------------------------------------------------------------------------------------
    def full_run(self) -> list[dict]:
        rows = []
        for mode in ("none", "cuda-graph") if self.cuda else ("none",):
            self.clear()
            steps = 4 if self.args.smoke else 200
            config = self.finetune_config(False, steps=steps, mixed_precision="auto", compile=mode)
            start = time.perf_counter()
            finetuner = Finetuner(config, pipeline=self.pipeline(torch.bfloat16 if self.cuda else torch.float32))
            setup = time.perf_counter() - start
            result = finetuner.train(progress=False)
            total = time.perf_counter() - start
            validation = [h["validation"] for h in result.history if "validation" in h]
            rows.append({"steps": steps, "compile": mode, "setup_s": setup, "total_s": total,
                         "train_s": finetuner.seconds, "precision": finetuner.precision,
                         "heldout_before": validation[0], "heldout_after": validation[-1]})
            print(json.dumps(rows[-1]), flush=True)
            del finetuner, result
        return rows


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(results: dict) -> str:
    env, size, batch = results["environment"], results["image_size"], results.get("batch", 4)
    lines = [f"# SepEn training step: project vs reference ({env['device']})", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}. Model: {results['model']}, "
             f"batch {batch}, {size} px, K trainable. Ratios against the published reference (fp32).", ""]
    for name in ("step", "memory", "sampling", "full_run"):
        if isinstance(results.get(name), dict) and "error" in results[name]:
            lines += [f"Section {name} failed: {results[name]['error']}", ""]
    steps = results["step"] if isinstance(results.get("step"), list) else []
    for configuration in ("single pair", "multi-concept + norm loss"):
        rows = [r for r in steps if r["configuration"] == configuration]
        base = next((r for r in rows if r["variant"].startswith("reference, fp32") and "median_s" in r), None)
        lines += [f"## {configuration}", "", "| variant | map reading | median s/step | speed-up | peak GiB | "
                  "memory ratio |", "|---|---|---|---|---|---|"]
        for r in rows:
            reading = r.get("map_reading", "not recorded")
            if "median_s" not in r:
                lines.append(f"| {r['variant']} | {reading} | {r.get('error', '')} | | | |")
                continue
            speed = f"{base['median_s'] / r['median_s']:.2f}x" if base else ""
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
            ratio = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base and r["peak_gib"] else "n/a"
            lines.append(f"| {r['variant']} | {reading} | {r['median_s']:.4f} | {speed} | {peak} | {ratio} |")
        lines.append("")
    lines += ["## Memory presets under a cap (fp16, batch 4 global, 512 px)", "",
              "| cap | preset | fits | median s/step | peak GiB |", "|---|---|---|---|---|"]
    for r in results["memory"] if isinstance(results.get("memory"), list) else []:
        if "skipped" in r:
            lines.append(f"| {r['skipped']} | | | | |")
        else:
            lines.append(f"| {r['cap_gib']} GiB | {r['preset']} | {r['fits']} | {r.get('median_s', 0):.4f} | "
                         f"{(r.get('peak_gib') or 0):.2f} |")
    s = results.get("sampling") or {}
    if "plain" in s:
        lines += ["", "## Sampling with attention capture", "",
                  f"{s['settings']['num_inference_steps']} steps, batch {s['settings']['batch']}, {s['settings']['dtype']}: "
                  f"plain {s['plain']['images_per_s']:.2f} images/s, with capture "
                  f"{s['captured']['images_per_s']:.2f} images/s, overhead {100 * s['capture_overhead']:.1f}%.", ""]
    g = results.get("graph_equivalence") or {}
    if "max_weight_difference" in g:
        lines += ["## The CUDA graph step against the eager step (bf16, 8 steps from the same start)", "",
                  f"largest loss difference {g['max_loss_difference']:.2e}; largest weight difference "
                  f"{g['max_weight_difference']:.2e} (training moved the weights by up to "
                  f"{g['max_weight_change_in_training']:.2e}).", ""]
    runs = results.get("full_run") if isinstance(results.get("full_run"), list) else []
    if runs:
        lines += ["## A whole single-pair run", ""]
    for f in runs:
        lines += [f"- {f['steps']} steps, {f['precision']}, compile={f['compile']}: {f['train_s']:.1f} s of training, "
                  f"{f['total_s']:.1f} s with set-up and validation; held-out SepEn loss "
                  f"{f['heldout_before']['loss']:.4f} -> {f['heldout_after']['loss']:.4f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for benchmark.json and benchmark.md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, one timed step per row: checks the code paths")
    parser.add_argument("--model", help="a real checkpoint (hub id or folder) instead of random SD v1 weights")
    parser.add_argument("--sections", default="step,graph_equivalence,full_run,memory,sampling")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --smoke for the CPU check, or on a GPU machine.")
    bench = Bench(args)
    results = {"environment": environment(bench.device), "smoke": args.smoke,
               "model": "tiny" if args.smoke else (args.model or "SD v1 architecture, random weights")}
    results["image_size"] = 64 if args.smoke else 512
    results["batch"] = bench.batch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = {"step": bench.step_table, "memory": bench.memory_budget, "sampling": bench.sampling,
                "graph_equivalence": bench.graph_equivalence, "full_run": bench.full_run}
    for name in args.sections.split(","):
        try:  # one failing section must not cost the others' numbers (a GPU lease is short)
            results[name] = sections[name]()
        except Exception as error:  # noqa: BLE001 - recorded in the results, then the next section runs
            results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"section {name} failed: {results[name]['error']}", flush=True)
        (out / "benchmark.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "benchmark.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
