import math

import numpy as np
import pytest
import torch

from lightning_stability.metrics import CodebookUsage


def _hand(codes_list, n_q, k):
    hist = np.zeros((n_q, k))
    for codes in codes_list:
        for s in range(n_q):
            hist[s] += np.bincount(codes[:, s].numpy().ravel(), minlength=k)
    p = hist / hist.sum(1, keepdims=True)
    entropy = -np.array([sum(x * math.log(x) for x in row if x > 0) for row in p])
    return np.exp(entropy), (hist == 0).mean(1)


def test_accumulated_histogram_gives_hand_computed_perplexity_and_dead_fraction():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 6, (2, 3, 7), generator=g), torch.randint(0, 3, (4, 3, 5), generator=g)]
    metric = CodebookUsage(num_codebooks=3, codebook_size=10)
    for codes in batches:
        metric.update(codes)
    result = metric.compute()
    perplexity, dead = _hand(batches, 3, 10)
    np.testing.assert_allclose(result["perplexity"].numpy(), perplexity, rtol=1e-6)
    np.testing.assert_allclose(result["dead_fraction"].numpy(), dead, rtol=1e-6)
    assert (result["dead_fraction"] >= 0.4).all()  # codes 6..9 never drawn


def test_collapsed_and_uniform_stages_hit_the_bounds():
    metric = CodebookUsage(num_codebooks=2, codebook_size=4)
    uniform = torch.arange(4).repeat(3).view(1, 1, 12)
    collapsed = torch.zeros(1, 1, 12, dtype=torch.long)
    metric.update(torch.cat([uniform, collapsed], dim=1))
    result = metric.compute()
    assert result["perplexity"].tolist() == pytest.approx([4.0, 1.0])
    assert result["dead_fraction"].tolist() == pytest.approx([0.0, 0.75])
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.compute()
    assert empty["perplexity"].tolist() == [0.0, 0.0]
    assert empty["dead_fraction"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_codebooks": 0, "codebook_size": 4}, ValueError, "`num_codebooks` must be >= 1, got 0"),
        ({"num_codebooks": 2, "codebook_size": 2.5}, TypeError, "`codebook_size` must be an int, got 2.5"),
        ({"num_codebooks": "2", "codebook_size": 4}, TypeError, "`num_codebooks` must be an int, got '2'"),
        ({"num_codebooks": 2, "codebook_size": -4}, ValueError, "`codebook_size` must be >= 1, got -4"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        CodebookUsage(**kwargs)


def test_update_errors_name_the_shape_and_range():
    metric = CodebookUsage(num_codebooks=2, codebook_size=4)
    with pytest.raises(ValueError, match=r"3 quantizer stages \(shape \(1, 3, 5\)\).*`num_codebooks`=2"):
        metric.update(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\].*got values in \[0, 4\]"):
        metric.update(torch.tensor([[[0, 4], [1, 1]]]))
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.zeros(1, 2, 5))
