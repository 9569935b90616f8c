"""attnlens.nn: modules against PyTorch's own modules and hand-written math, and capture()."""
import math
import threading

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlens as al
from attnlens.nn import AdditiveAttention, MultiHeadAttention, TransformerBlock, capture

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=dtype)


def randomize_(module, g):
    """Fresh random weights (biases included, so a missing bias cannot hide) in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def random_padding(g, B, Nk):
    """Bool (B, Nk), True = padding, each row keeps at least one key."""
    lengths = torch.randint(1, Nk + 1, (B,), generator=g)
    lengths[0] = max(1, Nk - 3)
    return ~al.masks.padding_mask(lengths, Nk)[:, 0, 0]


def manual_mha(m, query, key=None, value=None, keep=None, float_mask=None, causal=False):
    """Plain multi-head attention with repeated k/v heads (GQA), from m's weights."""
    key = query if key is None else key
    value = key if value is None else value
    B, Nq, E = query.shape
    Nk = key.shape[1]
    H, Hkv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    q = F.linear(query, m.q_proj.weight, m.q_proj.bias).view(B, Nq, H, hd).transpose(1, 2)
    k = F.linear(key, m.k_proj.weight, m.k_proj.bias).view(B, Nk, Hkv, hd).transpose(1, 2)
    v = F.linear(value, m.v_proj.weight, m.v_proj.bias).view(B, Nk, Hkv, hd).transpose(1, 2)
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Nk, hd): query head h uses kv head h // (H/Hkv)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, Nq, Nk)
    if float_mask is not None:
        s = s + float_mask
    allowed = torch.ones(s.shape, dtype=torch.bool)
    if keep is not None:
        allowed = allowed & keep
    if causal:
        allowed = allowed & torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    s = s.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(s, dim=-1) @ v  # (B, H, Nq, hd)
    return F.linear(y.transpose(1, 2).reshape(B, Nq, E), m.out_proj.weight, m.out_proj.bias)


def copy_from_torch(ref: tnn.MultiheadAttention, m: MultiHeadAttention):
    """Our q/k/v/out projections := PyTorch's in_proj (split in three) and out_proj."""
    E = ref.embed_dim
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            wq, wk, wv = ref.in_proj_weight.split(E)
        else:
            wq, wk, wv = ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight
        bq, bk, bv = ref.in_proj_bias.split(E)
        for lin, w, b in ((m.q_proj, wq, bq), (m.k_proj, wk, bk), (m.v_proj, wv, bv),
                          (m.out_proj, ref.out_proj.weight, ref.out_proj.bias)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)


# ------------------------------------------------------------------ MultiHeadAttention vs PyTorch

CASES = ["self", "cross", "padding", "causal", "bool_mask", "float_mask", "padding_and_mask", "kdim_vdim", "seq_first"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_lens", [False, True], ids=["sdpa", "lens"])
def test_mha_equals_torch_multiheadattention(case, use_lens):
    g = gen(CASES.index(case) + 100 * use_lens)
    B, E, H = 3, 12, 3
    Nq, Nk = (7, 7) if case in ("self", "causal", "bool_mask") else (5, 11)
    kdim, vdim = (6, 9) if case == "kdim_vdim" else (E, E)
    batch_first = case != "seq_first"
    ref = tnn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=F64).eval()
    randomize_(ref, g)
    m = MultiHeadAttention(E, H, kdim=kdim, vdim=vdim, causal=case == "causal", batch_first=batch_first).double()
    m.eval()
    copy_from_torch(ref, m)

    x = randn(g, B, Nq, E)
    key, value = randn(g, B, Nk, kdim), randn(g, B, Nk, vdim)
    ours_kw, ref_kw = {}, {}
    if case == "self" or case == "causal":
        key = value = x
    if case in ("padding", "padding_and_mask"):
        kpm = random_padding(g, B, Nk)
        ours_kw["key_padding_mask"] = ref_kw["key_padding_mask"] = kpm
    if case == "causal":
        ref_kw["attn_mask"] = torch.triu(torch.ones(Nq, Nk, dtype=torch.bool), diagonal=1)  # True = masked
    if case in ("bool_mask", "padding_and_mask"):
        keep = torch.rand(Nq, Nk, generator=g) < 0.6
        keep[:, 0] = True  # every query sees a key (PyTorch gives NaN otherwise; key 0 is never padding)
        ours_kw["attn_mask"], ref_kw["attn_mask"] = keep, ~keep  # opposite conventions
    if case == "float_mask":
        ours_kw["attn_mask"] = ref_kw["attn_mask"] = randn(g, Nq, Nk)
    if case == "seq_first":
        x, key, value = x.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

    expected = ref(x, key, value, need_weights=False, **ref_kw)[0]
    args = (x,) if case in ("self", "causal") else (x, key, value)
    got = m(*args, lens=al.Lens() if use_lens else None, **ours_kw)
    got = got[0] if use_lens else got
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


def test_mha_padding_plus_float_mask_and_fully_masked_row():
    """key_padding_mask combines with a float attn_mask; a query that sees nothing gets out_proj.bias."""
    g = gen(7)
    B, N, E, H = 2, 6, 8, 2
    m = randomize_(MultiHeadAttention(E, H).double(), g)
    x = randn(g, B, N, E)
    kpm = random_padding(g, B, N)
    fm = randn(g, N, N)
    fm[2] = float("-inf")  # query 2 sees no key at all
    got = m(x, key_padding_mask=kpm, attn_mask=fm)
    exp = manual_mha(m, x, keep=~kpm[:, None, None, :], float_mask=fm)
    live = [i for i in range(N) if i != 2]
    torch.testing.assert_close(got[:, live], exp[:, live], **TOL)
    assert torch.isnan(exp[:, 2]).all()  # plain softmax over nothing: NaN ...
    torch.testing.assert_close(got[:, 2], m.out_proj.bias.expand(B, E), **TOL)  # ... ours: attention 0


@pytest.mark.parametrize("H,Hkv,causal", [(4, 2, False), (4, 1, True), (6, 3, True)])
def test_gqa_equals_repeated_kv_heads(H, Hkv, causal):
    g = gen(H * 10 + Hkv)
    B, Nq, Nk, hd = 2, 5, 9, 3
    E = H * hd
    m = randomize_(MultiHeadAttention(E, H, num_kv_heads=Hkv, causal=causal).double(), g)
    assert m.k_proj.weight.shape == (Hkv * hd, E) and m.v_proj.weight.shape == (Hkv * hd, E)
    x, mem = randn(g, B, Nq, E), randn(g, B, Nk, E)
    kpm = random_padding(g, B, Nk)
    kpm[:, -1] = False  # with causal bottom-right alignment every query sees the last key
    got = m(x, mem, key_padding_mask=kpm)
    exp = manual_mha(m, x, mem, keep=~kpm[:, None, None, :], causal=causal)
    torch.testing.assert_close(got, exp, **TOL)
    torch.testing.assert_close(m(x, mem, key_padding_mask=kpm, lens=True)[0], exp, **TOL)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Nq=st.integers(1, 9), Nk=st.integers(1, 9), hd=st.integers(1, 5),
       heads=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)]), pad=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_mha_property_equals_manual(B, Nq, Nk, hd, heads, pad, seed):
    g = gen(seed)
    H, Hkv = heads
    m = randomize_(MultiHeadAttention(H * hd, H, num_kv_heads=Hkv).double(), g)
    x, mem = randn(g, B, Nq, H * hd), randn(g, B, Nk, H * hd)
    kpm = random_padding(g, B, Nk) if pad else None
    keep = None if kpm is None else ~kpm[:, None, None, :]
    torch.testing.assert_close(m(x, mem, key_padding_mask=kpm), manual_mha(m, x, mem, keep=keep), **TOL)


# ------------------------------------------------------------------ lens

def test_lens_equals_attention_on_projected_qkv_and_torch_weights():
    g = gen(11)
    B, Nq, Nk, E, H = 2, 6, 10, 12, 3
    ref = randomize_(tnn.MultiheadAttention(E, H, batch_first=True, dtype=F64), g)
    m = MultiHeadAttention(E, H).double()
    copy_from_torch(ref, m)
    x, mem = randn(g, B, Nq, E), randn(g, B, Nk, E)
    kpm = random_padding(g, B, Nk)
    lens = al.Lens(topk=3, rows="all")
    out, res = m(x, mem, key_padding_mask=kpm, lens=lens)

    hd = E // H
    q = m.q_proj(x).view(B, Nq, H, hd).transpose(1, 2)
    k = m.k_proj(mem).view(B, Nk, H, hd).transpose(1, 2)
    v = m.v_proj(mem).view(B, Nk, H, hd).transpose(1, 2)
    _, exp = al.attention(q.detach(), k.detach(), v.detach(), mask=~kpm[:, None, None, :], backend="reference",
                          lens=lens)
    for name in ("lse", "max_weight", "entropy", "received", "topk_weights", "weights"):
        torch.testing.assert_close(getattr(res, name), getattr(exp, name), **TOL)
    assert torch.equal(res.topk_indices, exp.topk_indices)
    assert res.lse.shape == (B, H, Nq) and res.received.shape == (B, H, Nk)
    assert (res.received.masked_select(kpm[:, None, :].expand(B, H, Nk)) == 0).all()  # padding gets nothing

    # the full weight rows are PyTorch's per-head attention weights
    _, w = ref(x, mem, mem, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(res.weights, w, **TOL)
    assert res.lse.requires_grad and not res.entropy.requires_grad  # the lse differentiates (merge); others not
    with capture(m) as cap:  # what a capture records keeps no autograd graph alive
        m(x, mem, key_padding_mask=kpm)
    assert not cap.results[0].result.lse.requires_grad


# ------------------------------------------------------------------ gradients, dropout

@pytest.mark.parametrize("use_lens", [False, True], ids=["sdpa", "lens"])
def test_gradients_finite_on_all_params_and_gradcheck(use_lens):
    g = gen(21 + use_lens)
    m = MultiHeadAttention(8, 4, num_kv_heads=2, causal=True)
    x = torch.randn(2, 7, 8, generator=g)
    out = m(x, lens=True)[0] if use_lens else m(x)
    out.pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    m64 = randomize_(MultiHeadAttention(4, 2, num_kv_heads=1, causal=True).double(), g)
    x64 = randn(g, 1, 5, 4).requires_grad_()
    mem = randn(g, 1, 6, 4).requires_grad_()
    if use_lens:
        fn = lambda a, b: m64(a, b, lens=True)[0]  # noqa: E731
    else:
        fn = lambda a, b: m64(a, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x64, mem))


def test_dropout_only_in_training():
    g = gen(31)
    m = randomize_(MultiHeadAttention(8, 2, dropout=0.5).double(), g)
    m0 = MultiHeadAttention(8, 2).double()
    m0.load_state_dict(m.state_dict())
    x = randn(g, 2, 9, 8)

    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, m0(x), **TOL)  # eval: no dropout at all

    m.train()
    for use_lens in (None, True):  # sdpa backend and torch backend
        outs = []
        for seed in (1, 2, 1):
            torch.manual_seed(seed)
            o = m(x, lens=use_lens)
            outs.append(o[0] if use_lens else o)
        assert not torch.allclose(outs[0], outs[1])  # different seeds, different dropout masks
        assert torch.equal(outs[0], outs[2])  # same seed, same output
        assert not torch.allclose(outs[0], a)
    m0.train()
    torch.testing.assert_close(m0(x), a, **TOL)  # dropout=0 in training is deterministic


# ------------------------------------------------------------------ TransformerBlock

def manual_block(blk, x, activation=F.gelu, keep=None):
    m = blk.attn

    def ln(mod, t):
        return F.layer_norm(t, (t.shape[-1],), mod.weight, mod.bias, mod.eps)

    def ff(t):
        return F.linear(activation(F.linear(t, blk.ff[0].weight, blk.ff[0].bias)), blk.ff[2].weight, blk.ff[2].bias)

    attn = lambda t: manual_mha(m, t, keep=keep, causal=m.causal)  # noqa: E731
    if blk.norm_first:
        h = x + attn(ln(blk.ln1, x))
        return h + ff(ln(blk.ln2, h))
    h = ln(blk.ln1, x + attn(x))
    return ln(blk.ln2, h + ff(h))


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre", "post"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_block_equals_hand_written(norm_first, activation):
    g = gen(41 + norm_first + 2 * (activation == "relu"))
    B, N, E, H = 2, 7, 12, 3
    blk = randomize_(TransformerBlock(E, H, ff_dim=20, norm_first=norm_first, activation=activation).double(), g)
    x = randn(g, B, N, E)
    kpm = random_padding(g, B, N)
    act = F.gelu if activation == "gelu" else F.relu
    got = blk(x, key_padding_mask=kpm)
    exp = manual_block(blk, x, act, keep=~kpm[:, None, None, :])
    torch.testing.assert_close(got, exp, **TOL)
    got2, res = blk(x, key_padding_mask=kpm, lens=True)
    torch.testing.assert_close(got2, exp, **TOL)
    assert res.entropy.shape == (B, H, N)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre", "post"])
def test_block_equals_torch_encoder_layer(norm_first):
    """Same weights as nn.TransformerEncoderLayer (relu) → same output."""
    g = gen(51 + norm_first)
    E, H, Fd = 8, 2, 16
    ref = randomize_(tnn.TransformerEncoderLayer(E, H, Fd, dropout=0.0, activation="relu", batch_first=True,
                                                 norm_first=norm_first, dtype=F64), g).eval()
    blk = TransformerBlock(E, H, ff_dim=Fd, norm_first=norm_first, activation="relu").double().eval()
    copy_from_torch(ref.self_attn, blk.attn)
    with torch.no_grad():
        for ours, theirs in ((blk.ln1, ref.norm1), (blk.ln2, ref.norm2), (blk.ff[0], ref.linear1),
                             (blk.ff[2], ref.linear2)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    x = randn(g, 3, 5, E)
    torch.testing.assert_close(blk(x), ref(x), **TOL)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre", "post"])
def test_causal_block_ignores_the_future(norm_first):
    g = gen(61 + norm_first)
    N, E = 9, 8
    causal = randomize_(TransformerBlock(E, 2, causal=True, norm_first=norm_first).double(), g)
    full = TransformerBlock(E, 2, causal=False, norm_first=norm_first).double()
    full.load_state_dict(causal.state_dict())
    x = randn(g, 2, N, E)
    for i in (0, 3, N - 2):
        x2 = x.clone()
        x2[:, i + 1:] = randn(g, 2, N - i - 1, E)
        torch.testing.assert_close(causal(x2)[:, : i + 1], causal(x)[:, : i + 1], **TOL)
        assert not torch.allclose(causal(x2)[:, i + 1:], causal(x)[:, i + 1:])
        assert not torch.allclose(full(x2)[:, : i + 1], full(x)[:, : i + 1])  # the test can fail


# ------------------------------------------------------------------ AdditiveAttention

def test_additive_hand_computed_tiny_case():
    att = AdditiveAttention(1, 2, 2).double()
    with torch.no_grad():
        att.w_q.weight.copy_(torch.tensor([[1.0], [0.0]]))  # W_q s = (s, 0)
        att.w_k.weight.copy_(torch.eye(2))  # W_k h = h
        att.v.weight.copy_(torch.tensor([[1.0, 1.0]]))  # vᵀ = (1, 1)
    s = torch.tensor([[1.0]], dtype=F64)
    h = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=F64)
    # scores: tanh(1)+tanh(0), tanh(2)+tanh(0), tanh(1)+tanh(1)
    e = [math.exp(math.tanh(1)), math.exp(math.tanh(2)), math.exp(2 * math.tanh(1))]
    a = [x / sum(e) for x in e]
    ctx, w = att(s, h)
    torch.testing.assert_close(w, torch.tensor([a], dtype=F64), **TOL)
    torch.testing.assert_close(ctx, torch.tensor([[a[1], a[2]]], dtype=F64), **TOL)  # Σ a_j h_j


@pytest.mark.parametrize("query_rank", [2, 3])
def test_additive_convex_combination(query_rank):
    g = gen(71 + query_rank)
    B, Nq, Nk, Dq, Dk, Hd = 3, 4, 7, 5, 6, 8
    att = randomize_(AdditiveAttention(Dq, Dk, Hd).double(), g)
    q = randn(g, B, Dq) if query_rank == 2 else randn(g, B, Nq, Dq)
    keys = randn(g, B, Nk, Dk)
    ctx, w = att(q, keys)
    lead = (B,) if query_rank == 2 else (B, Nq)
    assert ctx.shape == lead + (Dk,) and w.shape == lead + (Nk,)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(lead, dtype=F64), **TOL)
    exp_ctx = torch.einsum("bk,bkd->bd", w, keys) if query_rank == 2 else torch.einsum("bqk,bkd->bqd", w, keys)
    torch.testing.assert_close(ctx, exp_ctx, **TOL)
    # the plain formula, written out once more
    qq = q if query_rank == 3 else q[:, None]
    sc = torch.tanh((qq @ att.w_q.weight.T)[:, :, None] + (keys @ att.w_k.weight.T)[:, None]) @ att.v.weight.T
    w_exp = torch.softmax(sc[..., 0], -1)
    torch.testing.assert_close(w, w_exp if query_rank == 3 else w_exp[:, 0], **TOL)


def test_additive_mask_and_fully_masked_row():
    g = gen(81)
    B, Nk, Dq, Dk = 3, 6, 4, 5
    att = randomize_(AdditiveAttention(Dq, Dk, 7).double(), g)
    q, keys = randn(g, B, Dq).requires_grad_(), randn(g, B, Nk, Dk)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[0, [1, 4]] = False
    mask[2] = False  # batch 2 sees no key
    ctx, w = att(q, keys, mask)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w[:2].sum(-1), torch.ones(2, dtype=F64), **TOL)
    # masking keys == removing them
    kept = mask[0].nonzero()[:, 0]
    ctx0, w0 = att(q[:1], keys[:1, kept])
    torch.testing.assert_close(ctx[:1], ctx0, **TOL)
    torch.testing.assert_close(w[0, kept], w0[0], **TOL)
    # fully masked: zeros, no NaN, finite gradients
    assert torch.equal(ctx[2], torch.zeros(Dk, dtype=F64)) and torch.equal(w[2], torch.zeros(Nk, dtype=F64))
    (ctx.sum() + w.sum()).backward()
    assert torch.isfinite(q.grad).all()
    for p in att.parameters():
        assert torch.isfinite(p.grad).all()


# ------------------------------------------------------------------ capture

def two_blocks(seed=91):
    g = gen(seed)
    model = tnn.Sequential(TransformerBlock(8, 2, causal=True), TransformerBlock(8, 2, num_kv_heads=1)).double()
    return randomize_(model, g).eval(), randn(g, 2, 6, 8)


def test_capture_records_each_call_in_order():
    model, x = two_blocks()
    outside = model(x)
    with capture(model) as cap:
        y = model(x)
        assert isinstance(y, torch.Tensor)  # normal output, not a tuple
        model(x[:1])
    torch.testing.assert_close(y, outside, **TOL)
    assert [(r.name, r.index) for r in cap.results] == [("0.attn", 0), ("1.attn", 1), ("0.attn", 2), ("1.attn", 3)]
    assert cap.results[2].result.lse.shape == (1, 2, 6)
    # the defaults (Lens()), equal to asking each block for its lens by hand
    h, r0 = model[0](x, lens=al.Lens())
    _, r1 = model[1](h, lens=al.Lens())
    for rec, exp in zip(cap.results[:2], (r0, r1)):
        assert rec.result.topk_indices is None and rec.result.weights is None
        for name in ("lse", "max_weight", "entropy", "received"):
            torch.testing.assert_close(getattr(rec.result, name), getattr(exp, name), **TOL)
    # after the block: back to normal, nothing more recorded
    assert torch.equal(model(x), outside)
    assert len(cap.results) == 4


def test_capture_custom_lens_and_explicit_lens_call():
    model, x = two_blocks(92)
    lens = al.Lens(entropy=False, topk=2, rows=[0, -1])
    with capture(model, lens=lens) as cap:
        model(x)
        out, res = model[1].attn(x, lens=True)  # the caller's lens still comes back
        assert res.entropy is not None and res.topk_indices is None
    assert [r.name for r in cap.results] == ["0.attn", "1.attn", "1.attn"]
    for r in cap.results:
        assert r.result.entropy is None and r.result.topk_indices.shape == (2, 2, 6, 2)
        assert r.result.rows == (0, 5) and r.result.weights.shape == (2, 2, 2, 6)
    torch.testing.assert_close(cap.results[2].result.lse, res.lse, **TOL)


def test_capture_restores_after_exception():
    model, x = two_blocks(93)
    outside = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model) as cap:
            model(x)
            raise RuntimeError("boom")
    assert len(cap.results) == 2
    y = model(x)
    assert isinstance(y, torch.Tensor) and torch.equal(y, outside)
    assert len(cap.results) == 2
    from attnlens.integrations.capture import active
    assert active() == ()


def test_capture_nested_and_other_threads():
    model, x = two_blocks(94)
    with capture(model) as outer:
        with capture(model[1], lens=al.Lens(topk=3)) as inner:
            model(x)
        model(x)
        seen = []
        t = threading.Thread(target=lambda: seen.append(model(x)))  # another thread: not captured
        t.start()
        t.join()
        assert isinstance(seen[0], torch.Tensor)
    assert [r.name for r in outer.results] == ["0.attn", "1.attn", "0.attn", "1.attn"]
    assert [r.index for r in outer.results] == [0, 1, 2, 3]
    assert [(r.name, r.index) for r in inner.results] == [("attn", 0)]  # names relative to model[1]
    assert inner.results[0].result.topk_indices.shape == (2, 2, 6, 3)
    assert outer.results[1].result.topk_indices is None
    torch.testing.assert_close(inner.results[0].result.lse, outer.results[1].result.lse, **TOL)


def test_capture_gets_the_call_inputs_that_recompute_its_record():
    """The shared capture core hands each capture the call's inputs (detached q, k, v, mask and
    flags): enough to recompute a recorded layer with another lens."""
    model, x = two_blocks(95)
    lens = al.Lens(topk=3, rows=[1])
    with capture(model, lens=lens) as cap:
        calls, keep = [], cap.record
        cap.record = lambda call, result: (calls.append(call), keep(call, result))
        model(x)
    assert [c.module for c in calls] == [model[0].attn, model[1].attn]
    assert [c.causal for c in calls] == [True, False] and calls[1].k.shape == (2, 1, 6, 4)  # GQA: 1 kv head
    for call, rec in zip(calls, cap.results):
        assert not call.q.requires_grad and call.dropout_p == 0.0
        _, again = al.attention(call.q, call.k, call.v, lens=lens, **call.options())
        assert torch.equal(again.topk_indices, rec.result.topk_indices)
        torch.testing.assert_close(again.weights, rec.result.weights, **TOL)


def test_capture_rejects_bad_arguments():
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        with capture(tnn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError, match="module"):
        with capture("model"):
            pass
    with pytest.raises(TypeError, match="lens"):
        with capture(MultiHeadAttention(4, 2), lens="all"):
            pass


# ------------------------------------------------------------------ argument checks

@pytest.mark.parametrize("make,exc,name", [
    (lambda: MultiHeadAttention(10, 3), ValueError, "embed_dim"),
    (lambda: MultiHeadAttention(12, 4, num_kv_heads=3), ValueError, "num_kv_heads"),
    (lambda: MultiHeadAttention(12, 0), ValueError, "num_heads"),
    (lambda: MultiHeadAttention(12, 4, num_kv_heads=0), ValueError, "num_kv_heads"),
    (lambda: MultiHeadAttention(12, 4, dropout=1.0), ValueError, "dropout"),
    (lambda: MultiHeadAttention(12, 4, kdim=0), ValueError, "kdim"),
    (lambda: MultiHeadAttention(12, 4, window=-1), ValueError, "window"),
    (lambda: MultiHeadAttention(12.0, 4), TypeError, "embed_dim"),
    (lambda: TransformerBlock(12, 5), ValueError, "embed_dim"),
    (lambda: TransformerBlock(12, 4, ff_dim=0), ValueError, "ff_dim"),
    (lambda: TransformerBlock(12, 4, activation="swish"), ValueError, "activation"),
    (lambda: AdditiveAttention(4, 4, 0), ValueError, "hidden_dim"),
    (lambda: AdditiveAttention(0, 4, 4), ValueError, "query_dim"),
])
def test_bad_constructor_args(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


def test_bad_forward_args():
    m = MultiHeadAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, attn_mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="key"):
        m(x, torch.randn(3, 5, 8))
    att = AdditiveAttention(3, 4, 5)
    with pytest.raises(ValueError, match="keys"):
        att(torch.randn(2, 3), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="mask"):
        att(torch.randn(2, 3), torch.randn(2, 5, 4), torch.ones(2, 4, dtype=torch.bool))
