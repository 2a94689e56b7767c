"""Composition rules of several plugins' results (pure unit tests)."""
import pytest
import torch

from advplug import PluginError, Variant, Weights
from advplug.compose import combine_weights, merge_variants, summary


def v(name):
    return Variant(name, torch.zeros(2, 1))


def test_variants_are_merged_and_sorted_by_name():
    merged = merge_variants([[v("saa"), v("cw")], None, [v("pgd")]])
    assert [x.name for x in merged] == ["cw", "pgd", "saa"]


def test_duplicate_variant_name_is_an_error():
    with pytest.raises(PluginError, match="'pgd'"):
        merge_variants([[v("pgd")], [v("pgd")]])


def test_nobody_returns_weights():
    assert combine_weights([None, None], 2, 3) is None


def test_single_contributor_is_kept_as_returned():
    w = torch.tensor([0.5, 1.0, 4.0])
    out = combine_weights([None, Weights(adv=w)], 2, 3)
    assert torch.equal(out.adv, torch.stack([w, w]))  # [B] broadcast over variants, not renormalised
    assert out.nat is None


def test_product_keeps_the_product_of_row_means():
    a = torch.tensor([1.0, 2.0, 3.0])  # per instance, mean 2
    b = torch.tensor([[1.0, 1.0, 1.0], [4.0, 1.0, 1.0]])  # per variant, row means 1 and 2
    out = combine_weights([Weights(adv=a), Weights(adv=b)], 2, 3)
    row0 = torch.tensor([1.0, 2.0, 3.0]) / 2.0 * 2.0  # product (1, 2, 3), mean 2 -> mean 2 * 1
    row1 = torch.tensor([4.0, 2.0, 3.0]) / 3.0 * 4.0  # product (4, 2, 3), mean 3 -> mean 2 * 2
    assert torch.allclose(out.adv, torch.stack([row0, row1]))


def test_product_of_mean_one_weights_has_mean_one():
    a = torch.tensor([0.5, 1.5, 1.0])
    b = torch.tensor([[2.0, 0.5, 0.5], [1.0, 1.0, 1.0]])
    out = combine_weights([Weights(adv=a), Weights(adv=b)], 2, 3)
    assert torch.allclose(out.adv.mean(1), torch.ones(2))
    assert torch.allclose(out.adv[0], torch.tensor([1.0, 0.75, 0.5]) / 0.75)


def test_natural_weights_multiply_separately():
    out = combine_weights([Weights(nat=torch.tensor([2.0, 2.0])), Weights(adv=torch.tensor([1.0, 3.0]), nat=torch.tensor([1.0, 3.0]))], 1, 2)
    assert torch.allclose(out.nat, torch.tensor([2.0, 6.0]))  # (2, 6): product of means 2 * 2 = its mean 4
    assert torch.allclose(out.adv, torch.tensor([[1.0, 3.0]]))


def test_result_is_detached():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not combine_weights([Weights(adv=w * 2)], 1, 2).adv.requires_grad


def test_wrong_shape_is_an_error():
    with pytest.raises(PluginError, match=r"\[B\]=3"):
        combine_weights([Weights(adv=torch.ones(4))], 1, 3)


def test_summary_effective_sample_size():
    s = summary(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    assert s["mean"] == pytest.approx(2.0) and s["max"] == 5.0 and s["min"] == 1.0
    assert s["ess"] == pytest.approx(64 / (4 * 28))  # (sum w)^2 / (n sum w^2)
