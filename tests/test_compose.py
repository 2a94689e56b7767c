"""Composition rules of several plugins' results: pure unit tests and the algebra as properties.

Global weights (one per instance, ``Weights.adv`` / ``nat``) multiply; one plugin's local weights
(one per variant inside the pair, ``Weights.local``) are kept exactly and distribute the pair's
weight; the final weight is ``instance[b] * local[v, b]``.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advplug import CombinedWeights, Declaration, PluginError, Variant, Weights
from advplug.composition import check_composition
from advplug.weights import adv_matrix, combine_weights, merge_variants, nat_vector, natural_weights, summary


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


def test_single_global_contributor_is_kept_as_returned_and_applies_to_the_pair():
    w = torch.tensor([0.5, 1.0, 4.0])
    out = combine_weights([None, Weights(adv=w)], 2, 3)
    assert isinstance(out, CombinedWeights)
    assert torch.equal(out.instance, w)  # not renormalised
    assert torch.equal(out.adv, torch.stack([w, w]))  # every variant of the pair
    assert out.nat is None and out.local is None


def test_globals_multiply_and_keep_the_product_of_their_means():
    a = torch.tensor([1.0, 2.0, 3.0])  # mean 2
    b = torch.tensor([4.0, 1.0, 1.0])  # mean 2
    out = combine_weights([Weights(adv=a), Weights(adv=b)], 1, 3)
    prod = a * b  # (4, 2, 3), mean 3
    assert torch.allclose(out.instance, prod / 3.0 * 4.0)


def test_mean_one_globals_stay_mean_one():
    a = torch.tensor([0.5, 1.5, 1.0])
    b = torch.tensor([2.0, 0.5, 0.5])
    out = combine_weights([Weights(adv=a), Weights(adv=b)], 2, 3)
    assert out.instance.mean().item() == pytest.approx(1.0)
    assert torch.allclose(out.instance, torch.tensor([1.0, 0.75, 0.5]) / 0.75)


def test_local_weights_are_kept_exactly_and_the_global_scales_the_pair():
    local = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.1, 0.0]])  # [V=2, B=3]
    g = torch.tensor([2.0, 0.5, 0.5])
    out = combine_weights([Weights(adv=g), Weights(local=local)], 2, 3)
    assert torch.equal(out.local, local)
    assert torch.allclose(out.adv, g[None] * local)
    # within each pair the split is the local method's: the ratio final / local is one number per instance
    assert torch.allclose(out.adv[:, :2] / local[:, :2], g[:2].expand(2, -1))


def test_natural_input_in_the_pair_gets_the_pair_weight():
    g = torch.tensor([2.0, 0.5])
    out = combine_weights([Weights(local=torch.ones(1, 2), local_nat=torch.tensor([0.3, 0.0])), Weights(adv=g)], 1, 2)
    assert torch.allclose(out.nat, torch.tensor([0.6, 0.0]))
    assert torch.equal(out.local_nat, torch.tensor([0.3, 0.0]))


def test_natural_weights_multiply_separately():
    out = combine_weights(
        [Weights(nat=torch.tensor([2.0, 2.0])), Weights(adv=torch.tensor([1.0, 3.0]), nat=torch.tensor([1.0, 3.0]))],
        1,
        2,
    )
    assert torch.allclose(out.nat, torch.tensor([2.0, 6.0]))  # (2, 6): product of means 2 * 2 = its mean 4
    assert torch.allclose(out.adv, torch.tensor([[1.0, 3.0]]))


def test_two_local_contributors_are_an_error():
    with pytest.raises(PluginError, match="local weights"):
        combine_weights([Weights(local=torch.ones(2, 3)), Weights(local=torch.ones(2, 3))], 2, 3)


def test_per_variant_global_weights_are_an_error():
    with pytest.raises(PluginError, match=r"one per instance.*Weights.local"):
        combine_weights([Weights(adv=torch.ones(2, 3))], 2, 3)
    out = combine_weights([Weights(adv=torch.full((1, 3), 2.0))], 2, 3)  # [1, B]: one view, accepted
    assert torch.equal(out.instance, torch.full((3,), 2.0))


def test_result_is_detached():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not combine_weights([Weights(adv=w * 2)], 1, 2).adv.requires_grad


def test_wrong_shape_is_an_error():
    with pytest.raises(PluginError, match=r"\[B\]=3"):
        combine_weights([Weights(adv=torch.ones(4))], 1, 3)
    with pytest.raises(PluginError, match=r"\[V, B\]=\[2, 3\]"):
        combine_weights([Weights(local=torch.ones(3, 3))], 2, 3)


def test_loss_helpers_on_plain_weights():
    """Weights a plugin hands straight to the loss (BiLAW's meta step): adv times local."""
    like = torch.zeros(1)
    w = Weights(
        adv=torch.tensor([2.0, 1.0]), local=torch.tensor([[0.5, 1.0], [1.0, 0.0]]), local_nat=torch.tensor([1.0, 3.0])
    )
    assert torch.equal(adv_matrix(w, 2, 2, like), torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    assert torch.equal(natural_weights(w), torch.tensor([2.0, 3.0]))
    assert torch.equal(nat_vector(None, 2, like), torch.ones(2))
    assert torch.equal(adv_matrix(Weights(adv=torch.ones(3, 2)), 3, 2, like), torch.ones(3, 2))


def test_summary_effective_sample_size():
    s = summary(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    assert s["mean"] == pytest.approx(2.0) and s["max"] == 5.0 and s["min"] == 1.0
    assert s["ess"] == pytest.approx(64 / (4 * 28))  # (sum w)^2 / (n sum w^2)


# -- the algebra as properties -----------------------------------------------------------------
V, B = 3, 8


def lrat_like_local(gen, c=0.5):
    """An LRAT-shaped local part: Eq. 12-style weights, the floor on row 1 (x*), Eq. 15."""
    w = 2 * torch.rand(V, B, generator=gen).pow(0.5) * (torch.rand(V, B, generator=gen) > 0.3)
    w[1] = 0.0
    w[1] = (c - w.sum(0)).clamp_min(0.0)
    scale = w.sum(0).mean()
    return w / scale, c / scale


def contributions(seed, n_globals, with_local, with_nat):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_globals):
        g = torch.rand(B, generator=gen) * 3 + 1e-3
        if i % 2 == 0:
            g = g / g.mean()  # mean 1, like MAIL / GAIRAT / BAT / BiLAW
        nat = torch.rand(B, generator=gen) + 0.1 if with_nat and i == 0 else None
        out.append(Weights(adv=g, nat=nat))
    if with_local:
        local, floor = lrat_like_local(gen)
        out.append(Weights(local=local))
    return out


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    for f in ("adv", "nat", "local", "instance"):
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None) or (x is not None and not torch.allclose(x, y, rtol=1e-5, atol=1e-7)):
            return False
    return True


cases = dict(
    seed=st.integers(0, 2**31 - 1), n_globals=st.integers(0, 3), with_local=st.booleans(), with_nat=st.booleans()
)


@settings(max_examples=40, deadline=None)
@given(perm_seed=st.integers(0, 1000), **cases)
def test_order_of_plugins_does_not_matter(perm_seed, seed, n_globals, with_local, with_nat):
    parts = contributions(seed, n_globals, with_local, with_nat)
    order = torch.randperm(len(parts), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    assert same(combine_weights(parts, V, B), combine_weights([parts[i] for i in order], V, B))


@settings(max_examples=40, deadline=None)
@given(where=st.integers(0, 4), **cases)
def test_abstaining_is_the_identity(where, seed, n_globals, with_local, with_nat):
    parts = contributions(seed, n_globals, with_local, with_nat)
    with_none = parts[:where] + [None] + parts[where:]
    a, b = combine_weights(parts, V, B), combine_weights(with_none, V, B)
    assert same(a, b)


@settings(max_examples=40, deadline=None)
@given(where=st.integers(0, 4), **cases)
def test_all_ones_weights_change_nothing(where, seed, n_globals, with_local, with_nat):
    parts = contributions(seed, n_globals, with_local, with_nat)
    ones = Weights(adv=torch.ones(B), nat=torch.ones(B) if with_nat else None)
    a, b = combine_weights(parts, V, B), combine_weights(parts[:where] + [ones] + parts[where:], V, B)
    like = torch.zeros(1)
    assert torch.allclose(adv_matrix(a, V, B, like), adv_matrix(b, V, B, like), rtol=1e-5)
    assert torch.allclose(nat_vector(a, B, like), nat_vector(b, B, like), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_globals=st.integers(1, 3))
def test_each_methods_invariants_hold_after_combining(seed, n_globals):
    gen = torch.Generator().manual_seed(seed)
    local, floor = lrat_like_local(gen)
    globals_ = [torch.rand(B, generator=gen) + 1e-3 for _ in range(n_globals)]
    globals_ = [g / g.mean() for g in globals_]  # mean-1 methods
    out = combine_weights([Weights(adv=g) for g in globals_] + [Weights(local=local)], V, B)
    totals = out.local.sum(0)
    assert (totals >= floor - 1e-6).all()  # LRAT's floor (Eq. 7), on its part
    assert totals.mean().item() == pytest.approx(1.0, rel=1e-6)  # Eq. 15, on its part
    assert out.instance.mean().item() == pytest.approx(
        1.0, rel=1e-5
    )  # MAIL-style batch normalisation, on the global part
    assert torch.allclose(out.adv, out.instance[None] * local)


# -- start-up checks (pure) --------------------------------------------------------------------
LOCAL = Declaration(
    weights="local",
    variants={"cw": (), "pgd": ("kappa",), "saa": ()},
    anchor="pgd",
    provides=frozenset({"natural-term"}),
)


def test_composition_reads_the_anchor_of_the_local_method():
    c = check_composition(
        {"at": Declaration(), "lrat": LOCAL, "g": Declaration(weights="global", needs=frozenset({"stat:kappa"}))},
        "at",
        "lrat",
    )
    assert c.anchor == "pgd" and c.local == "lrat" and c.globals == ["g"] and c.reads == {"g": "pgd"}
    assert "g[b] x lrat[v, b]" in c.formula()


def test_composition_names_both_plugins_and_the_missing_stat():
    local = Declaration(weights="local", variants=LOCAL.variants, anchor="saa")
    with pytest.raises(
        PluginError, match=r"'g' with 'lrat': g needs 'kappa' on the view it reads, lrat's x\* 'saa'.*pgd"
    ):
        check_composition(
            {"at": Declaration(), "lrat": local, "g": Declaration(weights="global", needs=frozenset({"stat:kappa"}))},
            "at",
            "lrat",
        )


@pytest.mark.parametrize(
    "decls, match",
    [
        (
            {"a": Declaration(variants={"pgd": ()}), "b": Declaration(variants={"pgd": ()})},
            r"'a' with 'b': both generate a variant named 'pgd'",
        ),
        (
            {"a": Declaration(weights="local"), "b": Declaration(weights="local")},
            r"'a' with 'b': both return local weights",
        ),
        ({"a": Declaration(weights="global", view="fgsm")}, r"reads the view 'fgsm'"),
        ({"a": Declaration(weights="global", natural_weights=True)}, r"'a' with 'at': a weighs the natural term"),
        (
            {"a": Declaration(weights="global", needs=frozenset({"loss"})), "b": Declaration(weights="local")},
            r"'a' with 'b': a learns its weights through the run's loss",
        ),
        ({"a": Declaration(needs=frozenset({"validation"}))}, r"does not ask for it in requirements"),
        ({"a": Declaration(needs=frozenset({"telepathy"}))}, r"unknown need 'telepathy'"),
    ],
)
def test_composition_errors(decls, match):
    with pytest.raises(PluginError, match=match):
        check_composition({"at": Declaration(), **decls}, "at", "at")


def test_core_pgd_records_kappa_and_undeclared_generators_are_not_checked():
    c = check_composition(
        {"at": Declaration(), "g": Declaration(weights="global", needs=frozenset({"stat:kappa"}))}, "at", "at"
    )
    assert c.views == {"pgd": ("kappa", "p_true_lps")} and c.anchor == "pgd"
    c = check_composition(
        {"at": Declaration(), "x": Declaration(), "g": Declaration(weights="global", needs=frozenset({"stat:kappa"}))},
        "at",
        "at",
        undeclared_generators=["x"],
    )
    assert c.views is None


# -- the combination rule against a pure-Python transcription (lists, no call into compose) --------
def _mean(xs):
    return sum(xs) / len(xs)


def combine_by_hand(parts, n_variants, batch):
    """The documented rule written out again: global adv / nat multiply per part; with several
    contributors the product is rescaled to the product of their batch means; the local part is
    kept; adv[v][b] = instance[b] local[v][b]; nat = nat_global x instance x local_nat."""

    def product(vectors):
        if not vectors:
            return None
        out = [1.0] * batch
        for vec in vectors:
            out = [o * x for o, x in zip(out, vec)]
        if len(vectors) > 1:
            target = 1.0
            for vec in vectors:
                target *= _mean(vec)
            out = [o * target / _mean(out) for o in out]
        return out

    inst = product([p["adv"] for p in parts if p.get("adv") is not None])
    natg = product([p["nat"] for p in parts if p.get("nat") is not None])
    local = next((p["local"] for p in parts if p.get("local") is not None), None)
    local_nat = next((p["local_nat"] for p in parts if p.get("local_nat") is not None), None)
    if local is not None:
        adv = [[(inst[b] if inst else 1.0) * local[v][b] for b in range(batch)] for v in range(n_variants)]
    else:
        adv = [list(inst) for _ in range(n_variants)] if inst else None
    nat = natg
    if local_nat is not None:
        nat = [(inst[b] if inst else 1.0) * local_nat[b] * (natg[b] if natg else 1.0) for b in range(batch)]
    return adv, nat, inst


def _weights(p):
    t = {k: (torch.tensor(v, dtype=torch.float64) if v is not None else None) for k, v in p.items()}
    return Weights(**t)


_w = st.floats(0.01, 5.0)


@st.composite
def contributions_by_hand(draw):
    nv, b = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    vec = st.lists(_w, min_size=b, max_size=b)
    parts = [dict(adv=draw(st.none() | vec), nat=draw(st.none() | vec)) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        parts.insert(
            draw(st.integers(0, len(parts))),
            dict(local=draw(st.lists(vec, min_size=nv, max_size=nv)), local_nat=draw(st.none() | vec)),
        )
    return parts, nv, b


@settings(max_examples=80, deadline=None)
@given(contributions_by_hand())
def test_combination_against_a_transcription_of_the_rule(case):
    parts, nv, b = case
    out = combine_weights([_weights(p) for p in parts], nv, b)
    adv, nat, inst = combine_by_hand(parts, nv, b)
    if adv is None and nat is None:
        assert out is None or (out.adv is None and out.nat is None)
        return
    like = torch.zeros(1, dtype=torch.float64)
    assert adv_matrix(out, nv, b, like).tolist() == [pytest.approx(r, rel=1e-9) for r in (adv or [[1.0] * b] * nv)]
    assert (out.nat is None) == (nat is None)
    if nat is not None:
        assert out.nat.tolist() == pytest.approx(nat, rel=1e-9)
        assert natural_weights(out).tolist() == pytest.approx(nat, rel=1e-9)
    assert (out.instance is None) == (inst is None)
    if inst is not None:
        assert out.instance.tolist() == pytest.approx(inst, rel=1e-9)


def test_three_globals_keep_the_product_of_their_three_means():
    a, b, c = [1.0, 2.0, 3.0], [4.0, 1.0, 1.0], [0.5, 0.5, 2.0]  # means 2, 2, 1
    out = combine_weights([Weights(adv=torch.tensor(x)) for x in (a, b, c)], 1, 3)
    prod = [a[i] * b[i] * c[i] for i in range(3)]  # (2, 1, 6), mean 3
    assert out.instance.tolist() == pytest.approx([p * 4.0 / 3.0 for p in prod], rel=1e-6)


def test_the_batch_mean_given_is_the_one_used():
    """Under DDP the rescaling uses the all-reduced mean: a batch_mean that also counts another
    rank's instances (here one more of weight 1 in every part) changes the target."""
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])

    def with_other_rank(t):
        return (t.sum(-1, keepdim=True) + 1.0) / (t.shape[-1] + 1)

    out = combine_weights([Weights(adv=a), Weights(adv=b)], 1, 2, batch_mean=with_other_rank)
    ma, mb, mp = (1 + 3 + 1) / 3, (2 + 4 + 1) / 3, (2 + 12 + 1) / 3
    assert out.instance.tolist() == pytest.approx([2 * ma * mb / mp, 12 * ma * mb / mp], rel=1e-6)


def test_a_zero_product_stays_zero_not_nan():
    out = combine_weights([Weights(adv=torch.tensor([1.0, 0.0])), Weights(adv=torch.tensor([0.0, 1.0]))], 1, 2)
    assert out.instance.tolist() == [0.0, 0.0]


def test_combined_weights_are_not_multiplied_by_their_local_part_twice():
    local = torch.tensor([[0.5, 2.0], [1.5, 0.0]])
    g = torch.tensor([2.0, 3.0])
    out = combine_weights([Weights(adv=g), Weights(local=local, local_nat=torch.tensor([0.25, 4.0]))], 2, 2)
    like = torch.zeros(1)
    assert adv_matrix(out, 2, 2, like).tolist() == [[1.0, 6.0], [3.0, 0.0]]
    assert natural_weights(out).tolist() == [0.5, 12.0]
    assert nat_vector(out, 2, like).tolist() == [0.5, 12.0]


def test_natural_weights_of_plain_weights_by_hand():
    """Weights straight from a plugin: local_nat x adv (any [B]-sized shape) x nat."""
    ln, a, n = torch.tensor([1.0, 3.0]), torch.tensor([[2.0, 0.5]]), torch.tensor([4.0, 2.0])
    assert natural_weights(Weights(local_nat=ln)).tolist() == [1.0, 3.0]
    assert natural_weights(Weights(local_nat=ln, adv=a)).tolist() == [2.0, 1.5]
    assert natural_weights(Weights(local_nat=ln, adv=a, nat=n)).tolist() == [8.0, 3.0]
    assert natural_weights(Weights(local_nat=ln, nat=n)).tolist() == [4.0, 6.0]
    assert natural_weights(Weights(nat=n)).tolist() == [4.0, 2.0]
    assert natural_weights(Weights(adv=a)) is None and natural_weights(None) is None
    assert nat_vector(Weights(adv=a), 2, torch.zeros(1)).tolist() == [1.0, 1.0]


def test_adv_matrix_shapes_by_hand():
    like = torch.zeros(1, dtype=torch.float64)
    assert (
        adv_matrix(None, 2, 3, like).tolist() == [[1.0] * 3] * 2 and adv_matrix(None, 2, 3, like).dtype == torch.float64
    )
    assert adv_matrix(Weights(adv=torch.tensor([1.0, 2.0, 3.0])), 2, 3, like).tolist() == [[1.0, 2.0, 3.0]] * 2
    assert adv_matrix(Weights(adv=torch.tensor([[1.0, 2.0, 3.0]])), 2, 3, like).tolist() == [[1.0, 2.0, 3.0]] * 2
    assert adv_matrix(Weights(adv=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])), 2, 3, like).tolist() == [
        [1.0, 2.0, 3.0],
        [4.0, 5.0, 6.0],
    ]
    assert adv_matrix(Weights(local=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])), 2, 3, like).tolist() == [
        [1.0, 2.0, 3.0],
        [4.0, 5.0, 6.0],
    ]
    square = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # [V, B] with V = B: per variant, not an instance vector
    assert adv_matrix(Weights(adv=square), 2, 2, like).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    for bad in (torch.ones(2), torch.ones(2, 2), torch.ones(3, 3), torch.ones(1, 2)):
        with pytest.raises(PluginError, match=r"\[B\]=3 or \[V, B\]=\[2, 3\]"):
            adv_matrix(Weights(adv=bad), 2, 3, like)


def test_weight_shapes_are_checked_per_field():
    with pytest.raises(PluginError, match=r"weights #1: natural weights must have shape \[B\]=3, got \[2\]"):
        combine_weights([None, Weights(nat=torch.ones(2))], 1, 3)
    with pytest.raises(PluginError, match=r"local natural weights must have shape \[B\]=3, got \[1, 3\]"):
        combine_weights([Weights(local_nat=torch.ones(1, 3))], 1, 3)
    with pytest.raises(PluginError, match=r"two plugins returned local weights"):
        combine_weights([Weights(local_nat=torch.ones(3)), Weights(local=torch.ones(1, 3))], 1, 3)
    with pytest.raises(PluginError, match=r"adversarial weights must have shape \[B\]=3, got \[2, 2\]"):
        combine_weights([Weights(adv=torch.ones(2, 2))], 1, 3)
    out = combine_weights(
        [Weights(local_nat=torch.tensor([1.0, 2.0, 3.0]))], 2, 3
    )  # the natural input alone in the pair
    assert out.local is None and out.adv is None and out.nat.tolist() == [1.0, 2.0, 3.0]


def test_summary_by_hand():
    s = summary(torch.tensor([1.0, 3.0]))
    assert s == pytest.approx({"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "ess": 16 / (2 * 10)})  # population std
    assert summary(torch.zeros(3))["ess"] == 0.0
    assert summary(torch.tensor([0.1, 0.3]))["ess"] == pytest.approx(0.16 / (2 * 0.1))  # small weights: sum w^2 < 1
    assert summary(torch.tensor([[2.0, 2.0], [2.0, 2.0]]))["ess"] == pytest.approx(1.0)  # equal weights: ess 1
