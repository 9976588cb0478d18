"""The prompts SepEn trains and evaluates on: concept pairs in a template, and the shipped prompt sets.

    pair_prompt("cat", "dog")                    # PairPrompt('a photo of a cat and a dog', ('cat', 'dog'))
    sampler = PairSampler(pairs=[("cat", "dog")])
    sampler.sample(seed=0, step=3, index=1)      # the same answer in every process, on every resume

Training data is free: every sample is a prompt drawn from the concepts, so a sample is a pure function of
(seed, step, index in the global batch). That makes resuming exact and makes N processes see exactly the
batch one process would.
"""
from __future__ import annotations

import itertools
import json
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Sequence

import numpy as np

TRAIN_TEMPLATE = "a photo of a {a} {connector} a {b}"
PRIOR_TEMPLATE = "a photo of a {a}"


@dataclass(frozen=True)
class PairPrompt:
    prompt: str
    words: tuple[str, ...]  # the object words, in prompt order
    # which occurrence of each word in the prompt is the object (0-based): "photo" in "a photo of a photo and a
    # dog" is occurrence 1, since the template has one too; None: each word's only free occurrence
    occurrences: tuple[int, ...] | None = None

    @property
    def word_specs(self) -> list:
        """The words as `tokens.word_token_positions` reads them: ("photo", 1), or "cat" without occurrences."""
        if self.occurrences is None:
            return list(self.words)
        return [(word, occurrence) for word, occurrence in zip(self.words, self.occurrences)]


def pair_prompt(a: str, b: str, template: str = TRAIN_TEMPLATE, connector: str = "and") -> PairPrompt:
    """Fill the template; the template must name both objects, as `{a}` and `{b}`. The prompt remembers which
    occurrence of each word it placed, so a word that is also in the template ("photo") or inside the other
    word ("teddy bear" and "bear") is read where it was put."""
    if "{a}" not in template or "{b}" not in template:
        raise ValueError(f"The template {template!r} must contain {{a}} and {{b}} (the two objects), "
                         "e.g. 'a photo of a {a} {connector} a {b}'.")
    prompt, starts = _fill(template, dict(a=a, b=b, connector=connector))
    return PairPrompt(prompt, (a, b), (_placed(prompt, a, starts["a"]), _placed(prompt, b, starts["b"])))


def prior_prompt(concept: str, template: str = PRIOR_TEMPLATE) -> PairPrompt:
    if "{a}" not in template:
        raise ValueError(f"The prior template {template!r} must contain {{a}}, e.g. 'a photo of a {{a}}'.")
    prompt, starts = _fill(template, dict(a=concept))
    return PairPrompt(prompt, (concept,), (_placed(prompt, concept, starts["a"]),))


def _fill(template: str, values: dict) -> tuple[str, dict[str, int]]:
    """template.format(**values), and the character where each field's value begins (its first use)."""
    out, starts = "", {}
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out += literal
        if name is None:
            continue
        if name not in values:
            raise ValueError(f"The template {template!r} has a field {{{name}}}; the fields are "
                             f"{', '.join('{' + k + '}' for k in values)}.")
        starts.setdefault(name, len(out))
        value = {"r": repr, "s": str, "a": ascii}[conversion](values[name]) if conversion else values[name]
        out += format(value, spec or "")
    return out, starts


def _placed(prompt: str, word: str, start: int) -> int:
    from .tokens import occurrence_at

    return occurrence_at(prompt, word, start)


def pair_words(prompt: str) -> list[str]:
    """The two object words of a two-object prompt: 'a photo of a cat and a dog' -> ['cat', 'dog'].

    The last word on each side of the first "and" / "with" (so "a red car" gives "car").
    """
    return [word for word, _ in pair_word_specs(prompt)]


def pair_word_specs(prompt: str) -> list[tuple[str, int]]:
    """`pair_words` with the occurrence of each word (see tokens.word_token_positions): 'a photo of a teddy bear
    and a bear' -> [('bear', 0), ('bear', 1)], two objects that must not read the same token."""
    from .tokens import occurrence_at

    connector = re.search(r"\b(?:and|with)\b", prompt)
    left = list(re.finditer(r"\w+", prompt[:connector.start()])) if connector else []
    right = list(re.finditer(r"\w+", prompt[connector.end():])) if connector else []
    if not left or not right:
        raise ValueError(f"{prompt!r} does not name two objects; write it as 'a X and a Y' (or 'a X with a Y').")
    a, b = left[-1], right[-1]
    return [(a.group(), occurrence_at(prompt, a.group(), a.start())),
            (b.group(), occurrence_at(prompt, b.group(), connector.end() + b.start()))]


def prompt_objects(prompt: str) -> list[str]:
    """The object words of a one- or two-object prompt: 'a photo of a cat' -> ['cat'], '... and a dog' -> two."""
    return [word for word, _ in prompt_object_specs(prompt)]


def prompt_object_specs(prompt: str) -> list[tuple[str, int]]:
    """`prompt_objects` with each word's occurrence in the prompt."""
    from .tokens import occurrence_at

    if re.search(r"\b(?:and|with)\b", prompt):
        return pair_word_specs(prompt)
    words = list(re.finditer(r"\w+", prompt))
    if not words:
        raise ValueError(f"{prompt!r} names no object.")
    return [(words[-1].group(), occurrence_at(prompt, words[-1].group(), words[-1].start()))]


def check_distinct_concepts(concepts: Sequence[str]) -> None:
    """Concepts must be words (strings with letters or digits), and two concepts are different only if their
    words are: word matching ignores case and punctuation, so "cat" and "Cat" would read the same tokens."""
    from .tokens import prompt_words

    seen: dict[tuple[str, ...], str] = {}
    for concept in concepts:
        if not isinstance(concept, str) or not prompt_words(concept):
            raise ValueError(f"A concept is a word or phrase such as 'cat' or 'teddy bear'; got {concept!r}.")
        key = tuple(prompt_words(concept))
        if key in seen and seen[key] != concept:
            raise ValueError(f"The concepts {seen[key]!r} and {concept!r} are the same word (matching ignores case "
                             "and punctuation): list each concept once.")
        seen[key] = concept


class PairSampler:
    """Draws training prompts: from fixed `pairs`, or random pairs of distinct `concepts`.

    connectors: drawn uniformly per sample ("and", "with"); order: with `pairs`, each pair keeps its order
    unless `shuffle_order` (then either order, as the reference does for multi-concept training).
    """

    def __init__(self, pairs: Sequence[Sequence[str]] | None = None, concepts: Sequence[str] | None = None,
                 template: str = TRAIN_TEMPLATE, connectors: Sequence[str] = ("and",), shuffle_order: bool = False):
        if (pairs is None) == (concepts is None):
            raise ValueError("Give either `pairs` (e.g. [('cat', 'dog')]) or `concepts` (random pairs of them).")
        from .tokens import prompt_words

        if pairs is not None:
            pairs = [tuple(p) for p in pairs]
            check_distinct_concepts([w for p in pairs for w in p])
            # case and punctuation do not make two concepts: ("cat", "Cat") would train one word against itself
            bad = [p for p in pairs if len(p) != 2 or prompt_words(p[0]) == prompt_words(p[1])]
            if not pairs or bad:
                raise ValueError(f"Each pair must be two different concepts; got {bad or pairs}.")
        if concepts is not None:
            check_distinct_concepts(concepts)
            if len(set(concepts)) < 2:
                raise ValueError(f"Random pairs need at least 2 different concepts; got {list(concepts)}.")
        if not connectors:
            raise ValueError("Give at least one connector, e.g. ('and',).")
        self.pairs, self.concepts = pairs, (list(dict.fromkeys(concepts)) if concepts is not None else None)
        self.template, self.connectors, self.shuffle_order = template, tuple(connectors), shuffle_order
        pair_prompt("x", "y", template)  # validate the template now, not at step 1

    def sample(self, seed: int, step: int, index: int) -> PairPrompt:
        rng = np.random.default_rng([seed, step, index, 17])
        if self.pairs is not None:
            a, b = self.pairs[rng.integers(len(self.pairs))]
        else:
            a, b = (self.concepts[i] for i in rng.choice(len(self.concepts), size=2, replace=False))
        if self.shuffle_order and rng.random() < 0.5:
            a, b = b, a
        return pair_prompt(a, b, self.template, self.connectors[rng.integers(len(self.connectors))])

    def batch(self, seed: int, step: int, start: int, size: int) -> list[PairPrompt]:
        """Samples start .. start+size-1 of the global batch of `step`."""
        return [self.sample(seed, step, index) for index in range(start, start + size)]

    def all_prompts(self) -> list[PairPrompt]:
        """Every prompt the sampler can draw (for caching text embeddings; fixed pairs only)."""
        if self.pairs is None:
            raise ValueError("Random pairs of concepts have too many prompts to list.")
        orders = [(a, b) for a, b in self.pairs] + ([(b, a) for a, b in self.pairs] if self.shuffle_order else [])
        return [pair_prompt(a, b, self.template, c) for (a, b), c in itertools.product(orders, self.connectors)]

    @property
    def words(self) -> list[str]:
        return sorted({w for p in self.pairs for w in p}) if self.pairs is not None else list(self.concepts)


# ----------------------------------------------------------------------------------------------------------
# The shipped prompt sets (sae_utils/data/concepts.json)
# ----------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def concept_data() -> dict:
    return json.loads(resources.files("sae_utils").joinpath("data/concepts.json").read_text())


def attend_and_excite_prompts(category: str | None = None) -> list[str]:
    """The Attend-and-Excite benchmark: 276 two-object prompts; category "animals", "animals_objects",
    "objects" or None for all."""
    sets = concept_data()["attend_and_excite"]["prompts"]
    if category is None:
        return [p for prompts in sets.values() for p in prompts]
    if category not in sets:
        raise ValueError(f"Unknown category {category!r}; choose from {list(sets)}.")
    return list(sets[category])


def attend_and_excite_words(prompt: str) -> tuple[str, str]:
    """The two object words of a benchmark prompt: the nouns from the animal and object lists."""
    data = concept_data()["attend_and_excite"]
    vocabulary = set(data["animals"]) | set(data["objects"])
    words = tuple(w for w in prompt.replace(",", " ").split() if w in vocabulary)
    if len(words) != 2:
        raise ValueError(f"Expected two benchmark objects in {prompt!r}, found {words}.")
    return words


def multi_concept_split() -> dict[str, list[str]]:
    """The 220 concepts of the multi-concept experiment: {"seen": 200, "unseen": 20}."""
    data = concept_data()["multi_concept"]
    return {"seen": data["animal_train"] + data["object_train"], "unseen": data["animal_test"] + data["object_test"]}


def multi_concept_eval_prompts() -> list[str]:
    """The 200 held-out evaluation prompts (100 seen-seen, 80 seen-unseen, 20 unseen-unseen)."""
    return list(concept_data()["multi_concept"]["eval_prompts"])


# ----------------------------------------------------------------------------------------------------------
# A bug worth teaching: the released multi-concept script's hard-coded token positions
# ----------------------------------------------------------------------------------------------------------
RELEASED_LARGE_POSITIONS = (6, 9)  # train_large.py: index_c1 = 6, index_c2 = 9, for every prompt
RELEASED_LARGE_TEMPLATE = "a photo of a {a} {connector} a {b}"


def released_large_positions(tokenizer, a: str, b: str, connector: str = "and") -> dict:
    """What the released train_large.py reads for one prompt: the tokens at its fixed positions 6 and 9, the
    positions its concept words really have, and whether 6 and 9 both fall inside them.

    For "a photo of a cat and a dog" the words sit at 5 and 8, so 6 and 9 are "and" and the end token.
    """
    from .tokens import token_positions

    prompt = RELEASED_LARGE_TEMPLATE.format(a=a, b=b, connector=connector)
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    words = {a: token_positions(tokenizer, prompt, a), b: token_positions(tokenizer, prompt, (b, 1) if a == b else b)}
    read = {p: tokens[p].replace("</w>", "") for p in RELEASED_LARGE_POSITIONS}
    first, second = RELEASED_LARGE_POSITIONS
    return {"prompt": prompt, "reads": read, "word_positions": words,
            "both_inside": first in words[a] and second in words[b]}


def released_large_hit_rate(tokenizer, samples: int = 5000, seed: int = 0) -> dict:
    """Over random pairs of the 200 seen concepts (each order, "and" or "with", as train_large.py draws them), how
    often positions 6 and 9 both fall inside the two concept words; and how many concepts are several tokens."""
    from .tokens import token_positions

    seen = multi_concept_split()["seen"]
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(samples):
        i, j = rng.choice(len(seen), size=2, replace=False)
        hits += released_large_positions(tokenizer, seen[i], seen[j], ("and", "with")[rng.integers(2)])["both_inside"]
    several = sum(len(token_positions(tokenizer, f"a photo of a {c}", c)) > 1 for c in seen)
    return {"samples": samples, "both_inside": hits / samples, "multi_token_concepts": several, "concepts": len(seen)}
