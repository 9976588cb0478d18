"""From words of a prompt to the positions of their tokens in the text encoder's 77-token sequence.

    >>> token_positions(tokenizer, "a photo of a hippopotamus and a cat", "hippopotamus")
    [5, 6, 7]                      # 'hippo', 'potam', 'us</w>': one word, three tokens

Words are matched case-insensitively on whole words (letters and digits), ignoring punctuation, using the
tokenizer's own character offsets, so a word split into several tokens gets all of them. A repeated word is
picked by its occurrence: `("dog", 1)` is the second "dog". A phrase ("teddy bear") maps to the tokens of
all its words.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

WordSpec = Union[str, tuple[str, int]]  # "dog" (first occurrence) or ("dog", 1) (second occurrence)

_WORD = re.compile(r"[^\W_]+")  # a run of letters or digits: punctuation and spaces separate words


class WordNotInPromptError(ValueError):
    """The word is not among the prompt's words."""


class PromptTooLongError(ValueError):
    """The prompt has more tokens than the text encoder reads (77)."""


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words as they are matched: lower case, punctuation removed."""
    return [m.group().lower() for m in _WORD.finditer(prompt)]


def count_tokens(tokenizer, prompt: str) -> int:
    """Number of tokens the text encoder would read, start and end tokens included."""
    return len(tokenizer(prompt, truncation=False).input_ids)


def check_prompt_length(tokenizer, prompt: str) -> None:
    """Raise `PromptTooLongError` if the prompt would be silently truncated by the pipeline."""
    n, limit = count_tokens(tokenizer, prompt), tokenizer.model_max_length
    if n > limit:
        raise PromptTooLongError(
            f"The prompt has {n} tokens (start and end included) but the text encoder reads {limit}: "
            f"the last {n - limit} would be cut off silently. Shorten the prompt: {prompt[:80]!r}...")


def token_positions(tokenizer, prompt: str, word: WordSpec) -> list[int]:
    """Positions (in the encoded sequence, 0 = start token) of the tokens of `word` in `prompt`.

    word: a word or phrase, or `(word, occurrence)` with a 0-based occurrence for repeated words.
    """
    check_prompt_length(tokenizer, prompt)
    text, occurrence = (word, 0) if isinstance(word, str) else word
    start, end = _char_span(prompt, text, occurrence)
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    positions = [i for i, ((a, b), token_id) in enumerate(zip(encoding["offset_mapping"], encoding.input_ids))
                 if token_id not in special and a < end and b > start]
    if not positions:  # cannot happen for a word the tokenizer saw; guard against exotic normalisers
        raise WordNotInPromptError(f"The tokenizer produced no token for {text!r} in {prompt!r}.")
    return positions


def word_token_positions(tokenizer, prompt: str, words: Sequence[WordSpec]) -> list[list[int]]:
    """`token_positions` for each word: a list of K lists of positions."""
    if isinstance(words, str):
        raise TypeError(f"words must be a list of words, e.g. [{words!r}], not a single string.")
    return [token_positions(tokenizer, prompt, w) for w in words]


def _char_span(prompt: str, text: str, occurrence: int) -> tuple[int, int]:
    """Character span of the `occurrence`-th match of the words of `text` among the prompt's words."""
    target = prompt_words(text)
    if not target:
        raise WordNotInPromptError(f"{text!r} contains no word (letters or digits) to look for.")
    matches = list(_WORD.finditer(prompt))
    words = [m.group().lower() for m in matches]
    spans = [(matches[i].start(), matches[i + len(target) - 1].end())
             for i in range(len(words) - len(target) + 1) if words[i:i + len(target)] == target]
    if not spans:
        raise WordNotInPromptError(
            f"{text!r} is not a word of the prompt {prompt!r}. Its words are: {', '.join(words)}. "
            "Matching ignores case and punctuation but needs whole words ('cats' does not match 'cat').")
    if not 0 <= occurrence < len(spans):
        raise WordNotInPromptError(
            f"{text!r} appears {len(spans)} time(s) in {prompt!r}; occurrence={occurrence} is out of range "
            f"(0-based: use 0..{len(spans) - 1}).")
    return spans[occurrence]
