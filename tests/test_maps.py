import pytest
import torch

from sae_utils.maps import attention_stats, gather_word_maps, overlap, peak_activation


def blob(cx, cy, size=8, strength=1.0):
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return strength * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 2.0)


def test_gather_sums_or_averages_the_tokens_of_a_word():
    tokens = torch.rand(2, 77, 4, 4)
    maps = gather_word_maps(tokens, [[[1, 2], [5]], [[3], [4]]])
    torch.testing.assert_close(maps[0, 0], tokens[0, 1] + tokens[0, 2])
    torch.testing.assert_close(maps[1, 1], tokens[1, 4])
    mean = gather_word_maps(tokens, [[[1, 2]], [[3]]], combine="mean")
    torch.testing.assert_close(mean[0, 0], (tokens[0, 1] + tokens[0, 2]) / 2)


def test_gather_errors():
    with pytest.raises(ValueError, match="same number K"):
        gather_word_maps(torch.rand(2, 77, 4, 4), [[[1]], [[1], [2]]])
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        gather_word_maps(torch.rand(77, 4, 4), [[[1]]])
    with pytest.raises(ValueError, match="combine"):
        gather_word_maps(torch.rand(1, 77, 4, 4), [[[1]]], combine="max")


def test_peak_and_overlap_signals():
    disjoint = torch.zeros(1, 2, 8, 8)
    disjoint[0, 0, :4], disjoint[0, 1, 4:] = 0.5, 0.1
    assert peak_activation(disjoint).tolist()[0] == pytest.approx([0.5, 0.1])
    assert overlap(disjoint).item() == 0.0
    same_shape = torch.stack([blob(3, 3), blob(3, 3, strength=0.1)])[None]
    assert overlap(same_shape).item() == pytest.approx(1.0, abs=1e-6)  # scale-free
    apart = torch.stack([blob(1, 1), blob(6, 6)])[None]
    near = torch.stack([blob(3, 3), blob(4, 4)])[None]
    assert overlap(apart).item() < overlap(near).item() < 1.0


def test_stats_are_plain_numbers():
    maps = torch.stack([blob(1, 1, strength=0.4), blob(6, 6, strength=0.1)])[None]
    stats = attention_stats(maps, ["cat", "dog"])
    assert stats["words"] == ["cat", "dog"]
    assert stats["peak"][0] == pytest.approx([0.4, 0.1])
    assert stats["peak_ratio"][0] == pytest.approx(0.25)
    assert 0 <= stats["overlap"][0] < 0.05
