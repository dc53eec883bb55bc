"""The models' losses: code cross-entropy lives in test_recommender; here the alignment losses."""
from __future__ import annotations

import torch

from etegrec.models import info_nce, symmetric_kl


def test_symmetric_kl_is_zero_for_equal_logits_and_symmetric_otherwise():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(symmetric_kl(a, a + 3.0), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(symmetric_kl(a, b), symmetric_kl(b, a))
    assert symmetric_kl(a, b) > 0


def test_info_nce_is_lower_when_rows_match_their_partner():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(8, 5, generator=gen)
    shuffled = a[torch.randperm(8, generator=gen)]
    assert info_nce(a, 2.0 * a, 0.1) < info_nce(a, shuffled, 0.1)
