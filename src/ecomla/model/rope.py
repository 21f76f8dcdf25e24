"""Which rotary frequency pairs an MLA layer keeps, and where they sit in HF's half-split layout.

A Llama head of dimension D rotates D/2 pairs; pair j (frequency inv_freq[j], decreasing in j)
is made of dims j and j + D/2 (HF "rotate_half" layout). MLA keeps d_rope/2 pairs rotary and
moves the rest to the no-RoPE part. Self-contained (no ecomla imports): it is copied beside
checkpoints for trust_remote_code loading.
"""


def select_rope_pairs(head_dim: int, qk_rope_head_dim: int, how: str = "uniform") -> list[int]:
    """Indices of the frequency pairs that keep RoPE.

    uniform: evenly spaced, j_i = floor(i * (D/2) / (d_rope/2)); when d_rope divides D these are
        every (D/d_rope)-th pair, whose frequencies theta^(-2 j_i / D) = theta^(-2 i / d_rope)
        are exactly those of a standard rotary of dimension d_rope.
    high: j = 0 .. d_rope/2 - 1 (highest frequencies).  low: the last d_rope/2 pairs.
    """
    half, keep = head_dim // 2, qk_rope_head_dim // 2
    if how == "uniform":
        return [int(i * half // keep) for i in range(keep)]
    if how == "high":
        return list(range(keep))
    if how == "low":
        return list(range(half - keep, half))
    raise ValueError(f"unknown RoPE frequency choice {how!r}: use uniform, high or low")


def rope_columns(pair_indices, head_dim: int) -> list[int]:
    """Dims of a head (and columns of the (.., D) cos/sin tables) holding the kept pairs, in the
    half-split layout of a rotary of dimension d_rope: [j_0..j_k, j_0+D/2..j_k+D/2]."""
    half = head_dim // 2
    return [int(j) for j in pair_indices] + [int(j) + half for j in pair_indices]


def nope_columns(pair_indices, head_dim: int) -> list[int]:
    """Dims of a head that lose their rotation (the complement of rope_columns)."""
    kept = set(rope_columns(pair_indices, head_dim))
    return [i for i in range(head_dim) if i not in kept]


def is_standard_rotary(pair_indices, head_dim: int) -> bool:
    """True when the kept pairs are those of a standard rotary of dimension 2 * len(pairs)."""
    keep = len(pair_indices)
    if keep == 0 or (head_dim // 2) % keep:
        return False
    stride = (head_dim // 2) // keep
    return list(pair_indices) == [stride * i for i in range(keep)]


def rotary_progression(pair_indices) -> tuple[int, int] | None:
    """(a, s) when the kept pairs are the arithmetic progression a, a + s, a + 2s, ... (s >= 1), else None.

    Such pairs are exactly a standard rotary of dimension d = 2 * len(pairs): pair a + s i of a head of
    dimension D rotates at theta^(-2(a + s i)/D) = theta'^(-2i/d) / f with base theta' = theta^(s d / D)
    and linear scaling factor f = theta^(2a/D) (positions divided by f), which every engine applies."""
    p = [int(j) for j in pair_indices]
    if not p:
        return None
    s = p[1] - p[0] if len(p) > 1 else 1
    if s < 1 or any(b - a != s for a, b in zip(p, p[1:])):
        return None
    return p[0], s


def rotary_progressions(head_dim: int, qk_rope_head_dim: int) -> list[list[int]]:
    """Every arithmetic progression of d_rope/2 pairs among a head's D/2 pairs (a, a + s, ...; s >= 1)."""
    half, keep = head_dim // 2, qk_rope_head_dim // 2
    out = []
    for s in range(1, max(1, (half - 1) // max(1, keep - 1)) + 1 if keep > 1 else 2):
        for a in range(0, half - s * (keep - 1)):
            out.append([a + s * i for i in range(keep)])
    return out


def llama3_bands(rope_parameters: dict, head_dim: int) -> list[str]:
    """What llama3 rope scaling does to each frequency pair of a D-dim head (as transformers computes it, in
    float32): "high" (wavelength below original_max_position_embeddings / high_freq_factor: unchanged),
    "low" (beyond original / low_freq_factor: divided by `factor`), "mid" (interpolated between the two).
    Inside one band the scaled frequencies of a progression are again a standard rotary's."""
    import math

    import torch

    base = rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))  # (D/2,)
    old = rope_parameters["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    high = wavelen < old / rope_parameters["high_freq_factor"]
    low = wavelen > old / rope_parameters["low_freq_factor"]
    return ["high" if h else "low" if lo else "mid" for h, lo in zip(high.tolist(), low.tolist())]


__all__ = ["select_rope_pairs", "rope_columns", "nope_columns", "is_standard_rotary", "rotary_progression",
           "rotary_progressions", "llama3_bands"]
