"""Command line: `sae-finetune`, `sae-generate`, `sae-evaluate`, `sae-demo` (also `python -m sae_utils NAME`).

Every option of a config dataclass is a flag of the same name (`learning_rate` -> `--learning-rate`), so the
command line, the notebooks and the Python API share one set of names and defaults. Multi-GPU or
multi-process: `accelerate launch -m sae_utils finetune ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
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


def _argument_type(hint):
    hint = _optional_inner(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        inner = args[0] if args else str
        if typing.get_origin(inner) is tuple:
            raise TypeError("nested tuples need a dedicated flag")
        return inner, "+"
    return hint, None


# ----------------------------------------------------------------------------------------------------------
# sae-finetune
# ----------------------------------------------------------------------------------------------------------
def finetune_main(argv=None) -> None:
    from .finetune import FinetuneConfig, Finetuner
    from .prompts import multi_concept_split

    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    concepts = args.concepts
    if args.concepts_file:
        concepts = [line.strip() for line in Path(args.concepts_file).read_text().splitlines() if line.strip()]
    if args.multi_concept == "seen":
        concepts = multi_concept_split()["seen"]
    base = json.loads(Path(args.config).read_text()) if args.config else {}
    given = {k: v for k, v in vars(args).items() if parser.get_default(k) != v}
    config = dataclass_from_arguments(FinetuneConfig, argparse.Namespace(**{**vars(parser.parse_args([])), **base,
                                                                            **given}),
                                      pairs=[tuple(p) for p in args.pairs] if args.pairs else base.get("pairs"),
                                      concepts=concepts or base.get("concepts"))
    result = Finetuner(config, resume=not args.no_resume).train()
    if result.output_dir:
        print(f"delta written to {result.output_dir / 'delta.safetensors'}")


def main(argv=None) -> None:
    """`python -m sae_utils COMMAND ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"finetune": finetune_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m sae_utils {{{','.join(commands)}}} [options]   (--help after a command)")
        raise SystemExit(2)
    commands[argv[0]](argv[1:])
