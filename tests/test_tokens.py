import pytest

from sae_utils.tokens import (AmbiguousWordError, PromptTooLongError, WordNotInPromptError, count_tokens,
                              occurrence_at, prompt_words, token_positions, word_token_positions)


def decoded(tokenizer, prompt, positions):
    ids = tokenizer(prompt).input_ids
    return "".join(tokenizer.convert_ids_to_tokens([ids[p] for p in positions])).replace("</w>", "")


def test_single_token_words(tokenizer):
    prompt = "a photo of a cat and a dog"
    assert word_token_positions(tokenizer, prompt, ["cat", "dog"]) == [[5], [8]]


def test_word_split_into_three_tokens(tokenizer):
    prompt = "a photo of a hippopotamus and a cat"
    positions = token_positions(tokenizer, prompt, "hippopotamus")
    assert positions == [5, 6, 7]
    assert decoded(tokenizer, prompt, positions) == "hippopotamus"
    assert token_positions(tokenizer, prompt, "cat") == [10]


def test_repeated_words_by_occurrence(tokenizer):
    prompt = "a dog, a cat and a dog"
    assert token_positions(tokenizer, prompt, "dog") == [2]
    assert token_positions(tokenizer, prompt, ("dog", 1)) == [8]  # <s> a dog , a cat and a dog
    with pytest.raises(WordNotInPromptError, match="appears 2 time"):
        token_positions(tokenizer, prompt, ("dog", 2))


def test_case_and_punctuation(tokenizer):
    prompt = "A Cat, and a DOG!"
    assert token_positions(tokenizer, prompt, "cat") == [2]
    assert token_positions(tokenizer, prompt, "Dog") == [6]
    assert decoded(tokenizer, prompt, [6]) == "dog"


def test_phrase_maps_to_all_its_tokens(tokenizer):
    prompt = "a teddy bear with a crown"
    positions = token_positions(tokenizer, prompt, "teddy bear")
    assert decoded(tokenizer, prompt, positions) == "teddybear"


def test_possessive_and_hyphen(tokenizer):
    prompt = "the cat's hat and a dog-like toy"
    assert decoded(tokenizer, prompt, token_positions(tokenizer, prompt, "cat")) == "cat"
    assert decoded(tokenizer, prompt, token_positions(tokenizer, prompt, "dog")) == "dog"


def test_missing_word_lists_the_prompt_words(tokenizer):
    with pytest.raises(WordNotInPromptError) as error:
        token_positions(tokenizer, "a photo of a cat", "cats")
    assert "a, photo, of, a, cat" in str(error.value)
    with pytest.raises(WordNotInPromptError):
        token_positions(tokenizer, "a photo of a bobcat", "cat")  # whole words only


def test_prompt_over_77_tokens_is_rejected_with_the_count(tokenizer):
    prompt = " ".join(["cat"] * 80)
    assert count_tokens(tokenizer, prompt) == 82
    with pytest.raises(PromptTooLongError, match="82 tokens"):
        token_positions(tokenizer, prompt, "cat")
    token_positions(tokenizer, " ".join(["cat"] * 75), "cat")  # 77 tokens: exactly fits


def test_a_single_string_is_not_a_word_list(tokenizer):
    with pytest.raises(TypeError, match="list of words"):
        word_token_positions(tokenizer, "a cat", "cat")


def test_prompt_words():
    assert prompt_words("A photo of a Cat, and a dog!") == ["a", "photo", "of", "a", "cat", "and", "a", "dog"]


def test_two_words_never_read_the_same_token(tokenizer):
    # the second word used to take its first occurrence: both words read "cat" (or "bear") and trained on one map
    assert word_token_positions(tokenizer, "a photo of a cat and a Cat", ["cat", "Cat"]) == [[5], [8]]
    teddy = "a photo of a teddy bear and a bear"
    assert word_token_positions(tokenizer, teddy, ["teddy bear", "bear"]) == [[5, 6], [9]]
    assert word_token_positions(tokenizer, teddy, ["bear", "teddy bear"]) == [[9], [5, 6]]  # phrases claim first
    assert word_token_positions(tokenizer, "a bear and a teddy bear", ["bear", "teddy bear"]) == [[2], [5, 6]]
    with pytest.raises(AmbiguousWordError, match="would read the same token"):
        word_token_positions(tokenizer, teddy, ["teddy bear", ("bear", 0)])


def test_a_word_that_could_be_several_occurrences_is_refused(tokenizer):
    # "photo" is the template's word and the object's: the first one is not the object
    prompt = "a photo of a photo and a dog"
    with pytest.raises(AmbiguousWordError, match=r"appears 2 times.*\('photo', 1\)"):
        word_token_positions(tokenizer, prompt, ["photo", "dog"])
    assert word_token_positions(tokenizer, prompt, [("photo", 1), "dog"]) == [[5], [8]]
    with pytest.raises(AmbiguousWordError, match="asked for 2 time"):
        word_token_positions(tokenizer, "a cat and a dog", ["cat", "cat"])
    with pytest.raises(TypeError, match="occurrence"):
        word_token_positions(tokenizer, prompt, [("photo", "1")])


def test_occurrence_at_tells_a_placed_word_from_the_template(tokenizer):
    prompt = "a photo of a photo and a dog"
    assert occurrence_at(prompt, "photo", prompt.index("photo and")) == 1
    assert occurrence_at(prompt, "dog", prompt.index("dog")) == 0
    with pytest.raises(WordNotInPromptError, match="whole word"):
        occurrence_at(prompt, "hot", prompt.index("hot"))
