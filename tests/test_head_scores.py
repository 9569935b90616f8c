"""`attnlens.analysis.head_summary` against a dense float64 implementation written from its definition, in both
conventions (``"mean"`` and TransformerLens's ``detect_head`` ``"mul"`` score, itself written here from
transformer_lens/head_detector.py), on random GPT-2 and Llama (grouped-query) configs:

- every score — first, self, prev, next, the offsets, local (and its uniform baseline), the sink, duplicate,
  induction — equals loops over the dense weights, with key sets taken among the sequence's real positions;
- a left- or right-padded sequence scores exactly as the sequence alone (pads equal to BOS included), for every
  score, from the kept inputs and from full weights;
- a sink on a token other than the first ([SEP], punctuation) is found and named;
- a model trained here with a next-token head and an offset -2 head is labelled so.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import attnlens as al  # noqa: E402
from attnlens import analysis, hf  # noqa: E402
from attnlens import nn as alnn  # noqa: E402
from attnlens.analysis import LOCAL_WINDOW, MAX_OFFSET, OFFSETS  # noqa: E402
from test_hf import CAUSAL, _eager  # noqa: E402

PAD = 0  # the pad id equals BOS: a pad must never count as an earlier copy of BOS


# ---------------------------------------------------------------- the oracle, from the definitions


def oracle(P, ids, real, *, convention="mean", exclude_first=False, exclude_self=False) -> dict:
    """Every score of one sequence by plain loops: ``P (H, N, N)`` float64 dense weights (queries == keys),
    ``ids (N,)``, ``real (N,)`` bool."""
    H, N, _ = P.shape
    R = [j for j in range(N) if real[j]]
    live = [i for i in range(N) if real[i] and P[:, i].sum() > 0]
    first = R[0]

    def rel(i, d):  # the real token d real tokens after i
        k = R.index(i) + d
        return [R[k]] if 0 <= k < len(R) else []

    def earlier(i):
        return [j for j in R if j < i and ids[j] == ids[i]]

    sets = {"first": lambda i: [first], "self": lambda i: [i], "prev": lambda i: rel(i, -1),
            "next": lambda i: rel(i, 1), "duplicate": earlier,
            "induction": lambda i: [R[R.index(j) + 1] for j in earlier(i)],
            "local": lambda i: [j for d in range(-LOCAL_WINDOW, LOCAL_WINDOW + 1) for j in rel(i, d)]}
    for d in OFFSETS:
        sets[int(d)] = lambda i, d=int(d): rel(i, d)

    def keys(name, i):
        ks = sets[name](i)
        if exclude_first and name != "first":
            ks = [j for j in ks if j != first]
        if exclude_self and name not in ("self", 0):
            ks = [j for j in ks if j != i]
        return ks

    Pp = P.copy()  # TransformerLens: excluded columns zeroed
    if exclude_first:
        Pp[:, :, first] = 0
    if exclude_self:
        for i in range(N):
            Pp[:, i, i] = 0
    denom = sum(Pp[:, i].sum(-1) for i in live)

    def score(name):
        vals = [(P[:, i, keys(name, i)].sum(-1), bool(keys(name, i))) for i in live]
        if convention == "transformerlens":
            return sum(v for v, _ in vals) / denom
        vals = [v for v, has in vals if has]
        return np.mean(vals, 0) if vals else np.zeros(H)

    out = {name: score(name) for name in ("first", "self", "prev", "next", "duplicate", "induction", "local")}
    out["offsets"] = np.stack([score(int(d)) for d in OFFSETS], -1)
    have = np.array([sum(bool(keys(int(d), i)) for i in live) for d in OFFSETS])
    ok = (np.abs(OFFSETS) >= 2) & (2 * have >= len(live))
    best = np.argmax(np.where(ok, out["offsets"], -np.inf), -1)
    out["offset"], out["offset_score"] = OFFSETS[best], out["offsets"][np.arange(H), best]
    vis = P.sum(0) > 0  # (N, N): the keys a query may see (no weight underflows in these small models)
    out["local_uniform"] = np.full(H, np.mean([vis[i, keys("local", i)].sum() / vis[i].sum() for i in live]))
    recv = sum(Pp[:, i] for i in live) if exclude_self else sum(P[:, i] for i in live)  # (H, N)
    cand = np.array(real, dtype=bool)
    if exclude_first:
        cand[first] = False
    recv = np.where(cand, recv, -np.inf)
    out["sink_at"] = recv.argmax(-1)
    out["sink"] = recv.max(-1) / (denom if convention == "transformerlens" else len(live))
    return out


def compare(hs, want, *, atol=2e-6):
    for name, val in want.items():
        got = getattr(hs, name)
        if name in ("sink_at", "offset"):
            np.testing.assert_array_equal(got, val, err_msg=name)
        else:
            np.testing.assert_allclose(got, val, atol=atol, err_msg=name)


# ---------------------------------------------------------------- padded batches of small causal models


def padded(seqs, side):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    am = torch.zeros(len(seqs), n, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[b, sl], am[b, sl] = s, 1
    return dict(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0))


def sequences():
    """Two sequences that start with BOS (= the pad id) and repeat tokens (a vocabulary of 6)."""
    g = torch.Generator().manual_seed(7)
    return [torch.cat([torch.tensor([PAD]), torch.randint(0, 6, (n - 1,), generator=g)]) for n in (21, 13)]


@pytest.fixture(scope="module", params=CAUSAL)
def model(request):
    return request.param()


def capture(model, lens=None, **kw):
    with torch.no_grad(), hf.capture(model, lens=lens, keep_inputs=lens is None) as cap:
        model(**kw)
    return cap.layers()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("convention, exclude", [("mean", False), ("transformerlens", False), ("mean", True),
                                                 ("transformerlens", True)])
def test_scores_equal_the_dense_oracle_and_padding_changes_nothing(model, side, convention, exclude):
    seqs = sequences()
    kw = padded(seqs, side)
    atts = [a.double().numpy() for a in _eager(model, **kw).attentions]
    recs = capture(model, **kw)
    full = capture(model, al.Lens(rows="all"), **kw)  # the full-weight path (no kept inputs)
    opts = dict(convention=convention, exclude_first=exclude, exclude_self=exclude)
    for b, s in enumerate(seqs):
        alone = capture(model, input_ids=s[None])
        real = kw["attention_mask"][b].bool().numpy()
        shift = int(np.flatnonzero(real)[0])
        for rec, f, a, one in zip(recs, full, atts, alone):
            want = oracle(a[b], kw["input_ids"][b].numpy(), real, **opts)
            got = analysis.head_summary(rec, kw["input_ids"], batch=b, **opts)
            compare(got, want)
            compare(analysis.head_summary(f, kw["input_ids"], batch=b, **opts), want)
            by_live = analysis.head_summary(rec, kw["input_ids"], batch=b, live=kw["attention_mask"], **opts)
            compare(by_live, want)
            # the sequence alone: every score equal (sink_at counts positions from the sequence's first token)
            lone = analysis.head_summary(one, s[None], **opts)
            for fld in dataclasses.fields(lone):
                x, y = getattr(got, fld.name), getattr(lone, fld.name)
                if fld.name == "sink_at":
                    np.testing.assert_array_equal(x - shift, y)
                elif isinstance(y, np.ndarray):
                    np.testing.assert_allclose(x, y, atol=2e-6, err_msg=fld.name)
                else:
                    assert x == y, fld.name


def test_left_padding_no_longer_reads_a_pad_as_the_first_token(model):
    """The figures the old key sets gave: weight on key 0 (a pad: 0 for every head), the previous token of the
    first real token (a pad), pads equal to BOS as earlier copies."""
    seqs = sequences()
    kw = padded(seqs, "left")
    recs = capture(model, al.Lens(rows="all"), **kw)
    P = recs[0].result.weights[1].double().numpy()  # (H, N, N) of the padded sequence
    hs = analysis.head_summary(recs[0], kw["input_ids"], batch=1)
    assert np.abs(P[:, :, 0]).max() == 0  # key 0 is a pad: nobody looks at it
    assert (hs.first > 0.05).all()  # the first real token (BOS) is looked at
    shift = int(np.flatnonzero(kw["attention_mask"][1])[0])
    live = np.arange(shift, P.shape[1])
    np.testing.assert_allclose(hs.first, P[:, live, shift].mean(-1), atol=1e-6)


def test_transformerlens_convention_reads_lower_than_the_mean_where_sets_are_often_empty(model):
    """TransformerLens divides by all attention: queries with no earlier copy add 0 to the induction score."""
    s = sequences()[0]
    rec = capture(model, input_ids=s[None])[1]
    mean = analysis.head_summary(rec, s[None])
    tl = analysis.head_summary(rec, s[None], convention="transformerlens")
    ids = s.numpy()
    frac = np.mean([ids[i] in ids[:i] for i in range(len(ids))])  # queries with an earlier copy
    assert 0 < frac < 1
    np.testing.assert_allclose(tl.induction, mean.induction * frac, rtol=1e-6)  # rows sum to 1: exact ratio
    np.testing.assert_allclose(tl.entropy, mean.entropy)
    with pytest.raises(ValueError, match="convention"):
        analysis.head_summary(rec, s[None], convention="tl")


# ---------------------------------------------------------------- sinks on any fixed token


def test_a_sink_on_a_later_token_is_found_and_named():
    """Heads 0 and 1: every query shares a direction that key 5 (a [SEP]-like token) points along; head 2 none."""
    torch.manual_seed(0)
    H, N, D = 3, 12, 16
    u = torch.randn(D)
    u = 4 * u / u.norm()
    q = 0.5 * torch.randn(1, H, N, D) + u
    k = 0.1 * torch.randn(1, H, N, D)
    k[:, :2, 5] = 2 * u
    v = torch.randn(1, H, N, D)
    tokens = [f"w{i}" for i in range(N)]
    tokens[5] = "[SEP]"
    _, res = al.attention(q, k, v, lens=al.Lens(rows="all"))
    hs = analysis.head_summary(res)
    P = res.weights[0].double().numpy()
    np.testing.assert_allclose(hs.sink, P.mean(1).max(-1), atol=1e-6)
    assert hs.sink_at[:2].tolist() == [5, 5] and (hs.sink[:2] > 0.5).all() and hs.sink[2] < 0.5
    assert [k for k, _ in analysis.head_kinds(hs, N)[:2]] == ["sink", "sink"]
    assert analysis.kind_label("sink", hs, 0, tokens) == "sink on [SEP] #5"
    assert analysis.kind_label("sink", hs, 0) == "sink on #5"
    # the record path (kept inputs, no full weights): the sink from `received`
    mod = alnn.MultiHeadAttention(H * D, H)
    with torch.no_grad(), alnn.capture(mod) as cap:
        mod(torch.randn(1, N, H * D))
    hs = analysis.head_summary(cap.results[0])
    P = cap.results[0].ask(al.Lens(rows="all")).weights[0].double().numpy()
    np.testing.assert_allclose(hs.sink, P.mean(1).max(-1), atol=1e-6)
    np.testing.assert_array_equal(hs.sink_at, P.mean(1).argmax(-1))


# ---------------------------------------------------------------- positional heads, trained


VOCAB, N, DIM = 16, 16, 32


class TwoReadouts(torch.nn.Module):
    """Token + position embeddings, one bidirectional attention layer of 2 heads, and two readouts: the token after
    each position and the token two before it — which only a next-token head and an offset -2 head can supply."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Embedding(N, DIM)
        self.attn = alnn.MultiHeadAttention(DIM, 2)
        self.out = torch.nn.Linear(DIM, 2 * VOCAB)

    def forward(self, ids):
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.out(x + self.attn(x)).view(*ids.shape, 2, VOCAB)


def test_a_trained_next_token_head_and_offset_head_are_named():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TwoReadouts()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ce = torch.nn.functional.cross_entropy
    for _ in range(100):
        ids = torch.randint(0, VOCAB, (32, N), generator=gen)
        lg = model(ids)
        loss = ce(lg[:, :-1, 0].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)) + \
            ce(lg[:, 2:, 1].reshape(-1, VOCAB), ids[:, :-2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = torch.randint(0, VOCAB, (2, N), generator=gen)
    with torch.no_grad(), alnn.capture(model.eval()) as cap:
        lg = model(ids)
    acc = min((lg[:, :-1, 0].argmax(-1) == ids[:, 1:]).float().mean(), (lg[:, 2:, 1].argmax(-1) == ids[:, :-2])
              .float().mean())
    assert acc > 0.95, f"the model did not learn its two readouts (accuracy {acc:.2f})"
    for b in range(2):
        hs = analysis.head_summary(cap.results[0], ids, batch=b)
        kinds = analysis.head_kinds(hs, N)
        got = sorted(analysis.kind_label(k, hs, h) for h, (k, _) in enumerate(kinds))
        assert got == ["next-token", "offset -2"], kinds
        h_off = next(h for h, (k, _) in enumerate(kinds) if k == "offset")
        assert hs.offset[h_off] == -2 and hs.offset_score[h_off] > 0.9
        assert hs.offsets[h_off, MAX_OFFSET - 2] == hs.offset_score[h_off]
        # and their links are positional: none is informative
        res = cap.results[0].ask(al.Lens(topk=2), batch=b)
        idx, w = res.topk_indices.numpy(), res.topk_weights.double().numpy()
        toks = [f"t{i}" for i in range(N)]
        assert analysis.informative_links(idx, w, toks, [kinds]) == []
        assert analysis.informative_links(idx, w, toks, None)  # without the kinds, the offset links show


def test_visible_counts_of_a_band_in_closed_form_equal_the_band_mask():
    """Without a mask, how many keys each query sees and whether it sees given keys come from each row's key range
    [lo, hi) in closed form; they equal the dense band mask's (offsets before, inside and beyond the keys; windows on
    either side; causal or not)."""
    import types

    from attnlens.analysis import heads
    from attnlens.core import masks

    rng = np.random.default_rng(0)
    for _ in range(300):
        nq, nk, off = int(rng.integers(1, 40)), int(rng.integers(1, 50)), int(rng.integers(-10, 60))
        causal = bool(rng.integers(2))
        w = None if rng.integers(3) == 0 else tuple(None if rng.integers(2) else int(rng.integers(0, 9)) for _ in "lr")
        window = masks.normalize_window(None if w == (None, None) else w)
        pos, idx = np.arange(nq) + off, rng.integers(-1, nk, (nq, 3))
        keep = masks.band_keep(torch.arange(nq), torch.arange(nk), off, causal, window)
        keep = np.ones((nq, nk), bool) if keep is None else keep.numpy()
        rec = types.SimpleNamespace(call=types.SimpleNamespace(window=window, mask=None, causal=causal))
        count, seen = heads._visible_counts(rec, None, 0, pos, nk, idx)
        assert (count == keep.sum(-1)).all()
        assert (seen == (np.take_along_axis(keep, np.clip(idx, 0, nk - 1), -1) & (idx >= 0))).all()
