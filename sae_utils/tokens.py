"""From words of a prompt to the positions of their tokens in the text encoder's 77-token sequence.

    >>> token_positions(tokenizer, "a photo of a hippopotamus and a cat", "hippopotamus")
    [5, 6, 7]                      # 'hippo', 'potam', 'us</w>': one word, three tokens

Words are matched case-insensitively on whole words (letters and digits), ignoring punctuation, using the
tokenizer's own character offsets, so a word split into several tokens gets all of them. A repeated word is
picked by its occurrence: `("dog", 1)` is the second "dog". A phrase ("teddy bear") maps to the tokens of
all its words.

Several words at once (`word_token_positions`, which every map and loss uses) never share a token: phrases
claim their tokens first, each word then takes an occurrence no other word holds ("a teddy bear and a bear":
"bear" is the second one), and a word that could still be more than one occurrence is refused as ambiguous
(`AmbiguousWordError`) instead of being guessed: say `("photo", 1)`.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

WordSpec = Union[str, tuple[str, int]]  # "dog" (first occurrence) or ("dog", 1) (second occurrence)

_WORD = re.compile(r"[^\W_]+")  # a run of letters or digits: punctuation and spaces separate words


class WordNotInPromptError(ValueError):
    """The word is not among the prompt's words."""


class AmbiguousWordError(ValueError):
    """Words of one prompt would read the same token, or a word could be more than one of its occurrences."""


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

    word: a word or phrase (its first occurrence), or `(word, occurrence)` with a 0-based occurrence for
    repeated words. For the words of a prompt together, use `word_token_positions`: it refuses ambiguity.
    """
    check_prompt_length(tokenizer, prompt)
    text, occurrence = _spec(word)
    start, end = _char_span(prompt, text, occurrence or 0)
    return _tokens_in(tokenizer, prompt, _encode(tokenizer, prompt), text, start, end)


def word_token_positions(tokenizer, prompt: str, words: Sequence[WordSpec]) -> list[list[int]]:
    """The token positions of each word: a list of K lists of positions, no position in two lists.

    A `(word, occurrence)` is that occurrence. A plain word takes the occurrences that the other words leave
    free (phrases claim theirs first): ["teddy bear", "bear"] in "a teddy bear and a bear" reads the second
    "bear"; ["cat", "Cat"] in "a cat and a Cat" reads one each, in order. Raises `AmbiguousWordError` when two
    words would share a token, or when a plain word has more free occurrences than it is asked for (which one
    is meant is then a guess: pass `(word, occurrence)`).
    """
    if isinstance(words, str):
        raise TypeError(f"words must be a list of words, e.g. [{words!r}], not a single string.")
    check_prompt_length(tokenizer, prompt)
    encoding = _encode(tokenizer, prompt)
    specs = [_spec(w) for w in words]
    occurrences = []  # per word: the token positions of each of its occurrences
    for text, _ in specs:
        spans = _char_spans(prompt, text)
        occurrences.append([_tokens_in(tokenizer, prompt, encoding, text, a, b) for a, b in spans])
    chosen: list[list[int] | None] = [None] * len(specs)
    owner: dict[int, int] = {}  # token position -> the word (index) that reads it

    def claim(i: int, positions: list[int]) -> None:
        shared = sorted(set(positions) & set(owner))
        if shared:
            other = specs[owner[shared[0]]][0]
            raise AmbiguousWordError(
                f"{specs[i][0]!r} and {other!r} would read the same token (position {shared[0]}) of {prompt!r}: "
                "two object words must have their own tokens. Name another occurrence, e.g. "
                f"({specs[i][0]!r}, 1), or other words.")
        chosen[i] = positions
        owner.update({p: i for p in positions})

    for i, (text, occurrence) in enumerate(specs):  # explicit occurrences are what the caller means
        if occurrence is not None:
            _check_occurrence(prompt, text, occurrence, len(occurrences[i]))
            claim(i, occurrences[i][occurrence])
    plain = [i for i, (_, occurrence) in enumerate(specs) if occurrence is None]
    groups: dict[tuple[str, ...], list[int]] = {}  # the same words asked for more than once ("cat", "Cat")
    for i in sorted(plain, key=lambda i: -len(prompt_words(specs[i][0]))):  # phrases first
        groups.setdefault(tuple(prompt_words(specs[i][0])), []).append(i)
    for members in groups.values():
        members.sort()
        text, everywhere = specs[members[0]][0], occurrences[members[0]]
        free = [positions for positions in everywhere if not set(positions) & set(owner)]
        if len(free) < len(members):
            if len(everywhere) >= len(members):  # it is there, but other words hold it
                claim(members[0], next(p for p in everywhere if set(p) & set(owner)))
            raise AmbiguousWordError(
                f"{text!r} is asked for {len(members)} time(s) but appears {len(everywhere)} time(s) in {prompt!r}.")
        if len(free) > len(members):
            which = [everywhere.index(p) for p in free]
            raise AmbiguousWordError(
                f"{text!r} appears {len(everywhere)} times in {prompt!r}, and {len(free)} of them could be the "
                f"object meant: say which with (word, occurrence), 0-based, e.g. ({text!r}, {which[-1]}) for "
                f"the last one.")
        for i, positions in zip(members, free):
            claim(i, positions)
    return chosen  # type: ignore[return-value]


def word_spans(prompt: str, text: str) -> list[tuple[int, int]]:
    """The character spans of every whole-word occurrence of `text` in `prompt` (none: [])."""
    try:
        return _char_spans(prompt, text)
    except WordNotInPromptError:
        return []


def occurrence_at(prompt: str, text: str, start: int) -> int:
    """Which occurrence (0-based) of the words of `text` in `prompt` begins at character `start`: how a word
    placed into a template (the pair prompts) is told apart from the same word elsewhere in the prompt."""
    starts = [a for a, _ in _char_spans(prompt, text)]
    if start not in starts:
        raise WordNotInPromptError(
            f"{text!r} is not a whole word at character {start} of {prompt!r} (it must be separated from the "
            "text around it by spaces or punctuation).")
    return starts.index(start)


def _spec(word: WordSpec) -> tuple[str, int | None]:
    if isinstance(word, str):
        return word, None
    if not (isinstance(word, (tuple, list)) and len(word) == 2 and isinstance(word[0], str)
            and isinstance(word[1], int) and not isinstance(word[1], bool)):
        raise TypeError(f"A word is a string or a (word, occurrence) pair such as ('dog', 1); got {word!r}.")
    return word[0], word[1]


def _encode(tokenizer, prompt: str):
    return tokenizer(prompt, return_offsets_mapping=True)


def _tokens_in(tokenizer, prompt: str, encoding, text: str, start: int, end: int) -> list[int]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    positions = [i for i, ((a, b), token_id) in enumerate(zip(encoding["offset_mapping"], encoding.input_ids))
                 if token_id not in special and a < end and b > start]
    if not positions:  # cannot happen for a word the tokenizer saw; guard against exotic normalisers
        raise WordNotInPromptError(f"The tokenizer produced no token for {text!r} in {prompt!r}.")
    return positions


def _check_occurrence(prompt: str, text: str, occurrence: int, count: int) -> None:
    if not 0 <= occurrence < count:
        raise WordNotInPromptError(
            f"{text!r} appears {count} time(s) in {prompt!r}; occurrence={occurrence} is out of range "
            f"(0-based: use 0..{count - 1}).")


def _char_span(prompt: str, text: str, occurrence: int) -> tuple[int, int]:
    """Character span of the `occurrence`-th match of the words of `text` among the prompt's words."""
    spans = _char_spans(prompt, text)
    _check_occurrence(prompt, text, occurrence, len(spans))
    return spans[occurrence]


def _char_spans(prompt: str, text: str) -> list[tuple[int, int]]:
    """Character spans of every match of the words of `text` among the prompt's words (at least one)."""
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
    return spans
