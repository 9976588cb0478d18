"""The texts CLIP compares images with: one sub-prompt per object, and Attend-and-Excite's template ensemble.

    object_subprompts("a monkey and a red car", ["monkey", "car"])   # ['a monkey', 'a red car']
    object_subprompts("a photo of a cat with a dog", ["cat", "dog"]) # ['a photo of a cat', 'a photo of a dog']
    ensemble_texts("a cat and a dog")[0]                             # 'a bad photo of a cat and a dog.'

Attend-and-Excite's CLIP metric splits a prompt at " and " (else at " with ") and scores each half; an
object keeps its adjectives ("a red car"). This module splits at every connector, so K objects give K
sub-prompts, and checks that sub-prompt k holds word k. One addition for templated prompts: a shared lead-in
before the first object ("a photo of ") is copied to the later objects that lack one, so that both halves
of "a photo of a cat and a dog" are scored alike ("a photo of a dog", where Attend-and-Excite's split gives
"a dog"). The Attend-and-Excite prompts have no lead-in, so on them the two splits agree.
"""
from __future__ import annotations

import re
from typing import Sequence

from sae_utils.tokens import prompt_words

CONNECTORS = ("and", "with")
_CONNECTOR = re.compile(r"\s+(?:" + "|".join(CONNECTORS) + r")\s+", re.IGNORECASE)
_ARTICLE = re.compile(r"\b(?:a|an|the)\b", re.IGNORECASE)

# OpenAI CLIP's 80 ImageNet prompt templates (github.com/openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet,
# MIT licence); Attend-and-Excite embeds every prompt through all of them (metrics/imagenet_utils.py).
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.',
)


def object_subprompts(prompt: str, words: Sequence[str]) -> list[str]:
    """One sub-prompt per object word, in the order of `words` (which must be the prompt's order).

    "a cat and a dog" -> ["a cat", "a dog"]; "a horse with a glasses" -> ["a horse", "a glasses"];
    "a photo of a cat and a dog" -> ["a photo of a cat", "a photo of a dog"] (the lead-in is shared).
    A prompt with no connector ("and", "with") falls back to "a {word}" for each word. A prompt whose
    connectors do not cut it into exactly one piece per word ("a black and white cat with a dog") is an
    error: pass the sub-prompts to `clip_scores` yourself.
    """
    if isinstance(words, str) or not words:
        raise ValueError(f"words must be a non-empty list of object words, e.g. ['cat', 'dog']; got {words!r}.")
    parts = _CONNECTOR.split(prompt.strip())
    if len(parts) == 1:
        return [f"a {word}" for word in words]
    if len(parts) != len(words):
        raise ValueError(f"{prompt!r} splits at its connectors {CONNECTORS} into {len(parts)} pieces {parts}, "
                         f"but {len(words)} words {list(words)} were given. Pass one word per piece, or give "
                         "the sub-prompts yourself (clip_scores(..., subprompts=[...])).")
    starts = []
    for part, word in zip(parts, words):
        where = _find_words(part, word)
        if where is None:
            raise ValueError(f"Object {word!r} is not in the piece {part!r} of {prompt!r}: give the words in the "
                             f"order the prompt names them ({parts}).")
        articles = [m.start() for m in _ARTICLE.finditer(part, 0, where)]
        starts.append(articles[-1] if articles else 0)  # the object phrase starts at its article
    lead_in = parts[0][:starts[0]]
    return [part if start > 0 or not lead_in else lead_in + part for part, start in zip(parts, starts)]


def ensemble_texts(text: str, templates: Sequence[str] = IMAGENET_TEMPLATES) -> list[str]:
    """`text` placed in each template, with Attend-and-Excite's clean-up of doubled articles.

    The clean-up is theirs, kept as is so that scores match theirs: `str.replace("a a", "a")` then
    `str.replace("the a", "a")`. It also eats an article before a word that starts with "a"
    ("a dog and a apple" -> "a bad photo of a dog and apple.").
    """
    if any("{}" not in t for t in templates):
        raise ValueError("Every template needs a '{}' where the text goes, e.g. 'a photo of a {}.'.")
    return [t.format(text).replace("a a", "a").replace("the a", "a") for t in templates]


def _find_words(text: str, words: str) -> int | None:
    """Character index where the words of `words` (a word or a phrase) start in `text`, or None."""
    target = prompt_words(words)
    if not target:
        raise ValueError(f"{words!r} contains no word (letters or digits).")
    pattern = r"\b" + r"\W+".join(re.escape(w) for w in target) + r"\b"
    match = re.search(pattern, text, re.IGNORECASE)
    return None if match is None else match.start()
