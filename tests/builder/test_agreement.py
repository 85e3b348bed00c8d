"""The gate's and the benchmark's comparison of two next-token distributions (gate.agreement)."""

from __future__ import annotations

import pytest
import torch

from deploy.builder.gate import agreement


@pytest.mark.parametrize("scale, seed", [(2, 0), (10, 3), (20, 2)])
def test_kl_of_a_half_precision_record_against_itself_is_never_negative(scale, seed):
    """The benchmark keeps its reference record in half precision; such log-probabilities no longer
    sum to exactly 1, and the KL of the record against the same distribution in float32 came out
    negative (-3e-4 for these inputs before the fix; -3.5e-05 in a CI run)."""
    torch.manual_seed(seed)
    logits = torch.randn(16, 49152) * scale
    record, again = torch.log_softmax(logits, -1).half(), torch.log_softmax(logits, -1)
    agree, kl, positions = agreement(record, again)
    assert (agree, positions) == (16, 16)
    assert 0 <= kl / positions < 1e-4


def test_kl_measures_a_real_difference_and_ignores_masked_vocabulary():
    p = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]), -1)
    q = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 0.0]]), -1)
    agree, kl, positions = agreement(p, q)
    pp = p[0, :3].exp()  # q renormalised over the vocabulary both share (4 ids), p has 0 on the last
    expected = float((pp * (p[0, :3] - q[0, :3])).sum())
    assert (agree, positions) == (0, 1) and kl == pytest.approx(expected, rel=1e-6) and kl > 0.5
    # A padded vocabulary is cut to the shorter of the two, and both are renormalised over it.
    padded = torch.cat([p, torch.full((1, 3), float("-inf"))], -1)
    assert agreement(padded, p)[1] == pytest.approx(0.0, abs=1e-12)
