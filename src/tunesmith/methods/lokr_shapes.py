"""LoKr's factor shapes (PEFT's rule), without torch: which of a linear's Kronecker factors are full matrices and which
low-rank pairs, and their shapes. methods/lokr.py builds them and plan/parameters.py counts them from the same rule."""

from __future__ import annotations


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n) with m·n = dimension, as PEFT's lokr `factorization` does: (factor, dimension /
    factor) when `factor` > 0 divides it; otherwise the divisor pair closest to the square root whose smaller part is
    at most `factor` (any size for -1), smaller part first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for divisor in range(2, dimension + 1):
        if m >= dimension // m:
            break
        if dimension % divisor:
            continue
        if divisor > limit:
            break
        m = divisor
    return min(m, dimension // m), max(m, dimension // m)


def lokr_factors(in_features: int, out_features: int, r: int, decompose_both: bool, decompose_factor: int
                 ) -> dict[str, tuple[int, int]]:
    """PEFT's parameter name → shape for one linear: ΔW = W1 ⊗ W2 with out = a·b and in = c·d split by
    `factorization`, W1 (a × c) and W2 (b × d). W2 is the pair lokr_w2_a·lokr_w2_b of rank r when r < max(b, d)/2,
    else the full lokr_w2; W1 is a pair likewise only with `decompose_both`."""
    c, d = factorization(in_features, decompose_factor)
    a, b = factorization(out_features, decompose_factor)
    shapes = {}
    if decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if r < max(b, d) / 2:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
    else:
        shapes["lokr_w2"] = (b, d)
    return shapes
