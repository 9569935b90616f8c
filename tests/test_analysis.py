"""`attnlens.analysis`: rollout, value-norm contributions and head summaries on hand-checked cases,
and the lens-only answers (received, entropy, top-k) against the full weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlens as al
from attnlens import analysis
from attnlens import LensResult


def test_rollout_one_layer_by_hand():
    # two heads whose mean is [[1, 0], [.5, .5]]
    heads = np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    R = analysis.rollout([heads])
    # 0.5·I + 0.5·mean = [[1, 0], [.25, .75]]; rows already sum to 1
    np.testing.assert_allclose(R, [[1.0, 0.0], [0.25, 0.75]], atol=1e-15)


def test_rollout_two_layers_multiplies_bottom_to_top():
    A1 = np.array([[1.0, 0.0], [0.5, 0.5]])
    A2 = np.array([[0.0, 1.0], [0.0, 1.0]])
    R = analysis.rollout([A1, A2])
    # Â1 = [[1, 0], [.25, .75]],  Â2 = [[.5, .5], [0, 1]],  R = Â2 Â1
    np.testing.assert_allclose(R, [[0.625, 0.375], [0.25, 0.75]], atol=1e-15)
    np.testing.assert_allclose(analysis.rollout([A1, A2], residual=0.0), A2 @ A1, atol=1e-15)
    np.testing.assert_allclose(R.sum(-1), 1.0, atol=1e-12)


def test_rollout_renormalises_rows_that_do_not_sum_to_one():
    A = np.array([[0.0, 0.0], [0.2, 0.2]])  # e.g. a top-k approximation that dropped weight
    R = analysis.rollout([A])
    # 0.5·I + 0.5·A = [[.5, 0], [.1, .6]] → rows / their sums
    np.testing.assert_allclose(R, [[1.0, 0.0], [0.1 / 0.7, 0.6 / 0.7]], atol=1e-15)


def test_rollout_from_records_exact_and_topk(rng):
    layers, H, N = 3, 4, 9
    full, tk_all, tk_small = [], [], []
    for _ in range(layers):
        q, k, v = (torch.tensor(rng.standard_normal((1, H, N, 8)), dtype=torch.float32) for _ in range(3))
        _, res = al.attention(q, k, v, lens=al.Lens(topk=N, rows="all"))
        full.append(res)
        tk_all.append(LensResult(entropy=res.entropy, received=res.received, topk_indices=res.topk_indices,
                                 topk_weights=res.topk_weights))
        _, small = al.attention(q, k, v, lens=al.Lens(topk=3))
        tk_small.append(small)
    R = analysis.rollout(full)
    R_ref = analysis.rollout([r.weights for r in full])
    np.testing.assert_allclose(R, R_ref, atol=1e-12)
    with pytest.raises(ValueError, match="allow_topk"):
        analysis.rollout(tk_all)
    R_tk, cov = analysis.rollout(tk_all, allow_topk=True, return_coverage=True)
    np.testing.assert_allclose(R_tk, R, atol=1e-5)  # top-N is everything
    assert cov == pytest.approx(1.0, abs=1e-5)
    R_3, cov3 = analysis.rollout(tk_small, allow_topk=True, return_coverage=True)
    assert 0 < cov3 < 1 and np.allclose(R_3.sum(-1), 1.0)


def test_topk_dense_places_weights_and_ignores_placeholders():
    idx = np.array([[2, 0, -1], [0, -1, -1]])
    w = np.array([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(analysis.topk_dense(idx, w, 3), [[0.4, 0.0, 0.6], [1.0, 0.0, 0.0]])


def test_contributions_by_hand():
    w = np.array([[[0.5, 0.5], [1.0, 0.0]]])  # (H=1, Nq=2, Nk=2)
    norms = np.array([[2.0, 0.1]])  # ‖v_0‖ = 2, ‖v_1‖ = 0.1
    C = analysis.contributions(w, norms)
    # query 0 puts half its weight on each key, but key 1's value is 20× shorter
    np.testing.assert_allclose(C, [[[1.0, 0.05], [2.0, 0.0]]], atol=1e-15)
    with pytest.raises(ValueError, match="must agree"):
        analysis.contributions(w, np.ones((2, 2)))


def test_contributions_equal_norm_of_weighted_value_vectors(rng):
    # ‖α_ij v_j W_h‖ computed the long way, with a random output projection slice per head
    H, N, D, E = 3, 5, 4, 7
    w = rng.dirichlet(np.ones(N), size=(H, N))  # (H, N, N) rows sum to 1
    v = rng.standard_normal((H, N, D))
    Wo = rng.standard_normal((H, D, E))
    f = np.einsum("hnd,hde->hne", v, Wo)  # (H, N, E)
    long_way = np.linalg.norm(w[..., None] * f[:, None, :, :], axis=-1)  # (H, Nq, Nk)
    np.testing.assert_allclose(analysis.contributions(w, np.linalg.norm(f, axis=-1)), long_way, atol=1e-12)


class _Rec:  # the fields of attnlens.hf.HFRecord that analysis reads
    def __init__(self, result, value_norms=None, out_norms=None, q_offset=0):
        self.result, self.value_norms, self.out_norms, self.q_offset = result, value_norms, out_norms, q_offset


def test_contributions_from_a_record_prefer_the_output_projection():
    res = LensResult(weights=torch.tensor([[[[0.25, 0.75], [1.0, 0.0]]]]), rows=(0, 1))
    rec = _Rec(res, value_norms=torch.tensor([[[1.0, 1.0]]]), out_norms=torch.tensor([[[4.0, 2.0]]]))
    np.testing.assert_allclose(analysis.contributions(rec), [[[1.0, 1.5], [4.0, 0.0]]])
    np.testing.assert_allclose(analysis.contributions(rec, use_output_projection=False), res.weights[0].numpy())
    with pytest.raises(ValueError, match="rows='all'"):
        analysis.contributions(_Rec(LensResult(entropy=torch.zeros(1, 1, 2))))


def test_head_summary_by_hand():
    # one head, three tokens
    P = np.array([[1.0, 0.0, 0.0],
                  [0.5, 0.5, 0.0],
                  [0.2, 0.3, 0.5]])
    ent = -(np.where(P > 0, P * np.log(np.where(P > 0, P, 1)), 0)).sum(-1)
    res = LensResult(entropy=ent[None], max_weight=P.max(-1)[None], received=P.sum(0)[None],
                     weights=P[None], rows=(0, 1, 2))
    s = analysis.head_summary(res)
    assert s.exact
    np.testing.assert_allclose(s.first, [(1.0 + 0.5 + 0.2) / 3])
    np.testing.assert_allclose(s.self, [(1.0 + 0.5 + 0.5) / 3])
    np.testing.assert_allclose(s.prev, [(0.5 + 0.3) / 2])  # token 0 has no previous token
    np.testing.assert_allclose(s.entropy, [ent.mean()])
    np.testing.assert_allclose(s.max_weight, [(1.0 + 0.5 + 0.5) / 3])


def test_head_summary_without_weights_or_inputs_is_refused(rng):
    """No silent bounds any more: a bare LensResult with top-k only cannot give exact scores."""
    H, N = 5, 40
    q, k, v = (torch.tensor(rng.standard_normal((1, H, N, 16)) * 2, dtype=torch.float32) for _ in range(3))
    _, lens_only = al.attention(q, k, v, causal=True, lens=al.Lens(topk=4))
    with pytest.raises(ValueError, match="keep_inputs"):
        analysis.head_summary(lens_only)


def test_head_summary_of_a_generation_step_uses_the_query_position():
    # Nq = 1 new token after 3 cached: its own key is 3, the previous one is 2
    P = np.array([[[0.1, 0.2, 0.3, 0.4]]])  # (H=1, Nq=1, Nk=4)
    res = LensResult(entropy=np.zeros((1, 1)), max_weight=np.full((1, 1), 0.4), received=P[:, 0], weights=P,
                     rows=(0,))
    s = analysis.head_summary(_Rec(res, q_offset=3))
    np.testing.assert_allclose([s.self[0], s.prev[0], s.first[0]], [0.4, 0.3, 0.1])


def test_top_received_by_hand():
    received = torch.tensor([[[0.5, 2.0, 0.5], [1.5, 1.0, 0.5]]])  # (B=1, H=2, Nk=3), Nq = 3 queries
    res = LensResult(entropy=torch.zeros(1, 2, 3), received=received)
    idx, share = analysis.top_received(res, k=2)
    np.testing.assert_array_equal(idx, [1, 0])  # mean over heads: [1.0, 1.5, 0.5]
    np.testing.assert_allclose(share, [1.5 / 3, 1.0 / 3])
    idx, share = analysis.top_received(res, k=1, heads=[1])
    assert idx.tolist() == [0] and share[0] == pytest.approx(0.5)


def test_head_summary_self_and_prev_skip_queries_without_a_key_at_their_position():
    """Nq > Nk: the first Nq - Nk queries sit before the first key; their self/prev must not wrap around."""
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    _, res = al.attention(q, k, v, lens=al.Lens(rows="all", topk=3))
    w = res.weights  # (H, 6, 3); query i sits at key position i - 3
    hs = analysis.head_summary(res)
    np.testing.assert_allclose(hs.self, np.mean([w[:, i, i - 3] for i in range(3, 6)], axis=0))
    np.testing.assert_allclose(hs.prev, np.mean([w[:, i, i - 4] for i in range(4, 6)], axis=0))
