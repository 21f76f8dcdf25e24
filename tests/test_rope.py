"""RoPE pair selection: 'uniform' keeps exactly the frequencies of a standard rotary of d_rope."""

import torch

from ecomla.model.rope import is_standard_rotary, nope_columns, rope_columns, select_rope_pairs


def inv_freq(dim, theta=100000.0):
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def test_uniform_is_standard_rotary_of_rope_dim():
    for head_dim, d_rope in [(64, 32), (64, 16), (128, 64), (128, 32)]:
        pairs = select_rope_pairs(head_dim, d_rope, "uniform")
        torch.testing.assert_close(inv_freq(head_dim)[pairs], inv_freq(d_rope), rtol=1e-12, atol=0)
        assert is_standard_rotary(pairs, head_dim)


def test_high_low_and_columns():
    assert select_rope_pairs(64, 8, "high") == [0, 1, 2, 3]
    assert select_rope_pairs(64, 8, "low") == [28, 29, 30, 31]
    assert not is_standard_rotary([0, 1, 2, 3], 64)
    assert rope_columns([0, 2], 8) == [0, 2, 4, 6]
    assert nope_columns([0, 2], 8) == [1, 3, 5, 7]
    assert sorted(rope_columns([1, 3], 16) + nope_columns([1, 3], 16)) == list(range(16))
