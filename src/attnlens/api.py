"""`attention()`: the one entry point."""
from __future__ import annotations

import torch

from . import dispatch
from ._inputs import AttnInputs, validate


def attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0, backend="auto",
              lens=None):
    """Exact scaled dot-product attention, ``softmax(q kᵀ · scale + mask) v``, and what it does.

    Each output row is a convex combination of the rows of ``v``: row i of the output is
    ``Σ_j P[i, j] · v[j]`` with ``P = softmax(q kᵀ · scale + mask)`` taken row by row
    (non-negative weights that sum to 1). ``lens`` returns statistics of ``P`` computed inside
    the same pass, without ever holding ``P`` (n × n) in memory.

    Args:
        q: queries ``(N, D)``, ``(H, N, D)`` or ``(B, H, N, D)`` — a NumPy array or torch tensor
            of float16, bfloat16 (torch), float32 or float64.
        k: keys ``(..., Hkv, Nk, D)``, same rank, dtype, device and batch as ``q``.
            ``Hq % Hkv == 0``: query head ``h`` uses key/value head ``h // (Hq // Hkv)``
            (grouped-query / multi-query attention; K and V are not copied per query head).
        v: values ``(..., Hkv, Nk, Dv)``.
        mask: bool (True = may attend) or float (added to the scaled scores; ``-inf`` = may
            not attend), broadcastable to the scores' shape ``(B, Hq, Nq, Nk)`` (fewer leading
            dims for lower-rank input). Same kind (NumPy/torch) and device as ``q``.
        causal: bottom-right aligned — query i sees key j iff ``j <= i + (Nk - Nq)``, as in
            decoding with a KV cache. For ``Nq == Nk`` this is PyTorch's ``is_causal=True``::

                Nq=2, Nk=5 (two new tokens after a cache of 3)   Nq=5, Nk=5
                        k0 k1 k2 k3 k4                           k0 k1 k2 k3 k4
                    q0   x  x  x  x  .                       q0   x  .  .  .  .
                    q1   x  x  x  x  x                       q1   x  x  .  .  .
                                                             q2   x  x  x  .  .
                                                             ...
            When ``Nq > Nk`` the first ``Nq - Nk`` queries see no key (output 0).
        window: sliding window ``(left, right)``: query i, at key position ``p = i + Nk - Nq``,
            sees keys ``p - left <= j <= p + right``; ``None`` on a side = unbounded; an int w
            = ``(w, w)``. Combines with ``causal`` (then ``right`` is 0) and with ``mask``.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        dropout_p: probability of dropping a weight (kept weights scaled by ``1/(1-p)``), in
            ``[0, 1)``. Applied whenever ``dropout_p > 0``, as in PyTorch's functional form
            (pass 0.0 at evaluation). The lens describes the weights before dropout.
        backend: ``"auto"`` (first that can serve, see ``attnlens.backends()``), ``"triton"``
            (fused GPU kernels with the lens; CUDA), ``"sdpa"`` (PyTorch's fused kernel, no lens),
            ``"torch"`` (chunked, lens, autograd, any device) or ``"reference"`` (NumPy float64,
            dense). A named backend that cannot serve the
            call raises ``ValueError`` with its reasons. ``attnlens.use_backend`` sets it for a block.
        lens: ``None`` → return the output only. ``True`` → ``Lens()`` (the defaults); an
            ``attnlens.Lens`` → return ``(out, LensResult)``.

    Returns:
        ``out`` of shape ``(..., Hq, Nq, Dv)``, of ``q``'s kind, dtype and device; or
        ``(out, LensResult)`` when ``lens`` is given. float16/bfloat16 are computed with
        float32 accumulation. Lens fields carry no gradient.

    A query row with no visible key gets output 0, ``lse = -inf``, entropy 0 and weights 0 —
    never NaN. NaN or inf in an input propagates to the outputs of the rows it touches only.

    Raises:
        TypeError / ValueError naming the argument, what was seen and what was expected.
    """
    inp = validate(q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p, lens=lens)
    be = dispatch.select(inp, backend)
    out, res = be.run(inp)
    return _finish(inp, out, res)


def _finish(inp: AttnInputs, out, res):
    """Back to the caller's rank and kind."""
    lead = 4 - inp.rank  # leading unit dims added by validate()

    def back(t):
        t = t.detach() if isinstance(t, torch.Tensor) and t is not out else t
        t = t.reshape(t.shape[lead:])
        return t.cpu().numpy() if inp.numpy_io else t

    out = back(out)
    if inp.lens is None:
        return out
    return out, res.map_arrays(back)
