"""Command line: `sae-finetune`, `sae-generate`, `sae-evaluate`, `sae-demo` (also `python -m sae_utils NAME`).

Every option of a config dataclass is a flag of the same name (`learning_rate` -> `--learning-rate`), so the
command line, the notebooks and the Python API share one set of names and defaults. Multi-GPU or
multi-process: `accelerate launch -m sae_utils finetune ...`.

An error ends a command with one line, `sae-NAME: error: what is wrong and what to do`, and exit status 1 (2
for a malformed command line); `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: typing.Iterable[str] = ()) -> None:
    """One flag per field of the dataclass `cls`, typed from its annotations, defaulting to its defaults."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, default, hint = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name), hints[f.name]
        kind, nargs = _argument_type(hint)
        help_text = f"default: {default}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, nargs=nargs, default=default, help=help_text)


def dataclass_from_arguments(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():  # argparse gives lists; tuple fields stay tuples
        if isinstance(value, list) and typing.get_origin(_optional_inner(hints[name])) is tuple:
            values[name] = tuple(value)
    return cls(**{**values, **overrides})


def _optional_inner(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and len(args) == 1 else hint


def check_field_types(config) -> None:
    """Raise TypeError naming the first field of a dataclass whose value is not of its annotated type (a config
    file's "steps": "200", "adam_betas": [0.9]): caught here, not as a raw error deep in training."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise TypeError(f"{f.name}={value!r}: expected {_describe(hints[f.name])}.")


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, dict) or origin is dict:
        return isinstance(value, origin or hint)
    if origin in (list, tuple):  # JSON has lists only: either kind is accepted for either
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
             type(None): "null (None)"}
    if hint in names:
        return names[hint]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)}: " + ", ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list whose items are each {_describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def check_config_keys(cls, values: dict, source: str) -> None:
    """A config file may only hold fields of `cls`: a misspelt key would otherwise be ignored silently."""
    if not isinstance(values, dict):
        raise ValueError(f"{source} must hold a JSON object of {cls.__name__} fields, got {type(values).__name__}.")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"{source} has unknown key(s) {', '.join(hints)}; the fields of {cls.__name__} are "
                         f"{', '.join(known)}.")


def _argument_type(hint):
    hint = _optional_inner(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        inner = args[0] if args else str
        if typing.get_origin(inner) is tuple:
            raise TypeError("nested tuples need a dedicated flag")
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        return inner, len(args) if fixed else "+"  # (low, high) takes exactly two values
    return hint, None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (the program, the problem, where help is), not the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(prog: str, body, argv=None) -> None:
    """Run a command's `body(argv)`; an error becomes one line naming it (with --debug: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        body(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit(f"{prog}: interrupted. Run the same command again to continue where it stopped.") from None
    except Exception as error:  # noqa: BLE001 - every error is reported, in one line
        if debug:
            raise
        raise SystemExit(f"{prog}: error: {error_line(error)}") from None


def error_line(error: BaseException) -> str:
    """The error's message on one line; an error the code did not expect also names its type and --debug."""
    from .checkpoint import CheckpointError
    from .finetune import DivergenceError
    from .models import ModelNotAvailableError

    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, TypeError, OSError, ModelNotAvailableError, CheckpointError, DivergenceError)):
        return message
    return f"{type(error).__name__}: {message} (unexpected; --debug shows where)"


def _read_config(cls, path: str) -> dict:
    """A JSON file of `cls` fields: an object, every key a field (a misspelt one is refused, not ignored)."""
    try:
        values = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"The config file {path} is not JSON ({error}).") from error
    check_config_keys(cls, values, f"The config file {path}")
    return values


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback, not one line")


# ----------------------------------------------------------------------------------------------------------
# sae-finetune
# ----------------------------------------------------------------------------------------------------------
def finetune_main(argv=None) -> None:
    run_command("sae-finetune", _finetune, argv)


def _finetune(argv) -> None:
    from .finetune import FinetuneConfig, Finetuner
    from .prompts import multi_concept_split

    parser = OneLineParser(
        prog="sae-finetune", description="Finetune cross-attention keys with the Separate and Enhance losses.",
        epilog="Example: sae-finetune --model toy --pair star heart --steps 200 --output-dir outputs/star-heart")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"), dest="pairs",
                        help="a concept pair to train on (repeatable)")
    parser.add_argument("--concepts", nargs="+", help="multi-concept training: random pairs of these concepts")
    parser.add_argument("--concepts-file", help="a text file with one concept per line (multi-concept)")
    parser.add_argument("--multi-concept", choices=["seen"], help="train on the 200 seen concepts of the paper's split")
    parser.add_argument("--config", help="a JSON file with FinetuneConfig fields (flags override it)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if output_dir has a checkpoint")
    add_dataclass_arguments(parser, FinetuneConfig, skip=("pairs", "concepts", "extra"))
    _add_debug(parser)
    args = parser.parse_args(argv)
    concepts = args.concepts
    if args.concepts_file:
        concepts = [line.strip() for line in Path(args.concepts_file).read_text().splitlines() if line.strip()]
    if args.multi_concept == "seen":
        concepts = multi_concept_split()["seen"]
    base = _read_config(FinetuneConfig, args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if parser.get_default(k) != v}
    config = dataclass_from_arguments(FinetuneConfig, argparse.Namespace(**{**vars(parser.parse_args([])), **base,
                                                                            **given}),
                                      pairs=[tuple(p) for p in args.pairs] if args.pairs else base.get("pairs"),
                                      concepts=concepts or base.get("concepts"))
    result = Finetuner(config, resume=not args.no_resume).train()
    if result.output_dir:
        print(f"delta written to {result.output_dir / 'delta.safetensors'}")


# ----------------------------------------------------------------------------------------------------------
# sae-generate
# ----------------------------------------------------------------------------------------------------------
def generate_main(argv=None) -> None:
    run_command("sae-generate", _generate, argv)


def _generate(argv) -> None:
    from .sampling import GenerationConfig, generate

    parser = OneLineParser(
        prog="sae-generate", description="Images for prompts x seeds (plain, with a delta, or a test-time method), "
        "with metadata; resumable. Several processes: accelerate launch --num_processes N -m sae_utils generate ... "
        "(GPUs); on CPUs, torchrun --nproc_per_node N -m sae_utils generate ... (accelerate's --cpu runs one)",
        epilog="Example: sae-generate --model toy --prompt-set toy/held-out --num-seeds 16 --output-dir runs/toy-sd")
    parser.add_argument("--config", help="a JSON file with GenerationConfig fields (flags override it)")
    add_dataclass_arguments(parser, GenerationConfig)
    _add_debug(parser)
    args = parser.parse_args(argv)
    base = _read_config(GenerationConfig, args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if parser.get_default(k) != v}
    config = dataclass_from_arguments(GenerationConfig, argparse.Namespace(**{**vars(parser.parse_args([])), **base,
                                                                              **given}))
    summary = generate(config)
    print(f"{summary.generated} images generated, {summary.skipped} already there, in {summary.output_dir} "
          f"({summary.seconds:.1f} s)")


# ----------------------------------------------------------------------------------------------------------
# sae-evaluate
# ----------------------------------------------------------------------------------------------------------
def evaluate_main(argv=None) -> None:
    run_command("sae-evaluate", _evaluate, argv)


def _evaluate(argv) -> None:
    from .results import (check_evaluation_settings, compare_runs, evaluate_run, format_summary, load_run,
                          parse_metrics)

    parser = OneLineParser(
        prog="sae-evaluate", description="Score finished generation runs: scores.csv, summary.csv/json with 95 % "
        "bootstrap intervals, bar charts and image grids in each run folder; with several folders, a comparison.",
        epilog="Example: sae-evaluate runs/toy-sd runs/toy-sepen --metrics toy --compare-dir runs/comparison")
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="run folders written by sae-generate")
    parser.add_argument("--metrics", required=True,
                        help="'toy' (the toy world's exact evaluator) or any of 'clip,blip,detection'")
    parser.add_argument("--clip", help="CLIP model: hub id or local folder (default: openai/clip-vit-base-patch16)")
    parser.add_argument("--blip", help="BLIP captioner (default: Salesforce/blip-image-captioning-base)")
    parser.add_argument("--detector", help="OWLv2 / OWL-ViT detector (default: google/owlv2-base-patch16-ensemble)")
    parser.add_argument("--threshold", type=float, help="detector confidence threshold (default: the metric's)")
    parser.add_argument("--toy-threshold", type=float, default=0.5, help="toy evaluator threshold (default: 0.5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--compare-dir", help="where the comparison of several runs goes (default: "
                        "'comparison' next to the first run)")
    parser.add_argument("--no-figures", action="store_true", help="tables only, no bar charts or grids")
    _add_debug(parser)
    args = parser.parse_args(argv)
    metrics = parse_metrics(args.metrics)
    check_evaluation_settings(n_boot=args.n_boot, threshold=args.threshold, toy_threshold=args.toy_threshold,
                              batch_size=args.batch_size)
    for folder in args.output_dirs:  # every folder is a finished run: found out before any model loads
        load_run(folder)
    models = None
    if any(m in metrics for m in ("clip", "blip", "detection")):
        from .evaluation import load_metric_models
        from .evaluation.loading import DEFAULT_BLIP, DEFAULT_CLIP, DEFAULT_DETECTOR

        wants_clip = "clip" in metrics or "blip" in metrics  # BLIP's score compares captions in CLIP space
        models = load_metric_models(clip=(args.clip or DEFAULT_CLIP) if wants_clip else None,
                                    blip=(args.blip or DEFAULT_BLIP) if "blip" in metrics else None,
                                    detector=(args.detector or DEFAULT_DETECTOR) if "detection" in metrics
                                    else None, device=args.device)
    for folder in args.output_dirs:
        summary = evaluate_run(folder, metrics, n_boot=args.n_boot, figures=not args.no_figures, models=models,
                               threshold=args.threshold, toy_threshold=args.toy_threshold,
                               batch_size=args.batch_size)
        print(f"== {folder}\n{format_summary(summary)}")
    if len(args.output_dirs) > 1:
        summary = compare_runs(args.output_dirs, args.compare_dir, n_boot=args.n_boot,
                               figures=not args.no_figures)
        print(f"== comparison\n{format_summary(summary)}")


def main(argv=None) -> None:
    """`python -m sae_utils COMMAND ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"finetune": finetune_main, "generate": generate_main, "evaluate": evaluate_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m sae_utils {{{','.join(commands)}}} [options]   (--help after a command)")
        raise SystemExit(2)
    commands[argv[0]](argv[1:])
