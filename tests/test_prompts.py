import pytest

from sae_utils.prompts import (PairSampler, attend_and_excite_prompts, attend_and_excite_words, multi_concept_eval_prompts,
                               multi_concept_split, pair_prompt, pair_words)


def test_pair_prompt_fills_the_template():
    assert pair_prompt("cat", "dog").prompt == "a photo of a cat and a dog"
    assert pair_prompt("cat", "crown", connector="with").words == ("cat", "crown")
    with pytest.raises(ValueError, match=r"\{a\} and \{b\}"):
        pair_prompt("cat", "dog", template="a photo of a {a}")


def test_pair_words():
    assert pair_words("a photo of a cat and a dog") == ["cat", "dog"]
    assert pair_words("a monkey and a red car") == ["monkey", "car"]
    assert pair_words("a horse with a glasses") == ["horse", "glasses"]
    with pytest.raises(ValueError, match="two objects"):
        pair_words("a photo of a cat")


def test_prompt_objects_of_one_or_two_object_prompts():
    from sae_utils.prompts import prompt_objects

    assert prompt_objects("a photo of a cat") == ["cat"]
    assert prompt_objects("a photo of a cat and a dog") == ["cat", "dog"]


def test_samples_are_a_pure_function_of_seed_step_and_index():
    sampler = PairSampler(concepts=["cat", "dog", "bird", "lion"], connectors=("and", "with"), shuffle_order=True)
    batch = sampler.batch(seed=3, step=7, start=0, size=8)
    assert batch == sampler.batch(seed=3, step=7, start=0, size=8)
    assert batch[4:] == sampler.batch(seed=3, step=7, start=4, size=4)  # a process's slice of the global batch
    assert batch != sampler.batch(seed=3, step=8, start=0, size=8)
    assert all(p.words[0] != p.words[1] for p in batch)
    assert {p.prompt.split()[5] for p in sampler.batch(0, 0, 0, 64)} == {"and", "with"}


def test_fixed_pairs_and_their_prompts():
    sampler = PairSampler(pairs=[("cat", "dog")], shuffle_order=True)
    assert {p.prompt for p in sampler.all_prompts()} == {"a photo of a cat and a dog", "a photo of a dog and a cat"}
    assert sampler.words == ["cat", "dog"]
    with pytest.raises(ValueError, match="two different concepts"):
        PairSampler(pairs=[("cat", "cat")])
    with pytest.raises(ValueError, match="either"):
        PairSampler(pairs=[("cat", "dog")], concepts=["cat", "dog"])


def test_shipped_prompt_sets():
    assert len(attend_and_excite_prompts()) == 276
    assert [len(attend_and_excite_prompts(c)) for c in ("animals", "animals_objects", "objects")] == [66, 144, 66]
    assert attend_and_excite_words("a monkey and a red car") == ("monkey", "car")
    split = multi_concept_split()
    assert len(split["seen"]) == 200 and len(split["unseen"]) == 20 and not set(split["seen"]) & set(split["unseen"])
    assert len(multi_concept_eval_prompts()) == 200


def test_a_pair_prompt_knows_where_it_placed_each_word(tokenizer):
    from sae_utils.tokens import word_token_positions

    photo = pair_prompt("photo", "dog")  # the template has its own "photo": the object is the second one
    assert photo.prompt == "a photo of a photo and a dog" and photo.word_specs == [("photo", 1), ("dog", 0)]
    assert word_token_positions(tokenizer, photo.prompt, photo.word_specs) == [[5], [8]]
    teddy = pair_prompt("teddy bear", "bear")
    assert word_token_positions(tokenizer, teddy.prompt, teddy.word_specs) == [[5, 6], [9]]
    assert pair_prompt("cat", "dog", template="{b} and {a}, {{literal}}").prompt == "dog and cat, {literal}"
    with pytest.raises(ValueError, match=r"field \{c\}"):
        pair_prompt("cat", "dog", template="a {a} and a {b} and a {c}")
    with pytest.raises(ValueError, match="whole word"):
        pair_prompt("cat", "dog", template="a photo of {a}s and {b}s")


def test_concepts_that_differ_only_in_case_are_one_concept():
    with pytest.raises(ValueError, match="same word"):
        PairSampler(pairs=[("cat", "Cat")])
    with pytest.raises(ValueError, match="same word"):
        PairSampler(concepts=["cat", "dog", "Cat"])
    with pytest.raises(ValueError, match="word or phrase"):
        PairSampler(concepts=["cat", "!!"])
    PairSampler(pairs=[("teddy bear", "bear")])  # different words: allowed, and read apart


def test_object_words_with_their_occurrences():
    from sae_utils.prompts import pair_word_specs, prompt_object_specs

    assert pair_word_specs("a photo of a teddy bear and a bear") == [("bear", 0), ("bear", 1)]
    assert pair_word_specs("a photo of a photo and a dog") == [("photo", 1), ("dog", 0)]
    assert prompt_object_specs("a photo of a photo") == [("photo", 1)]
