"""The head scores name real circuits: a 2-layer attention-only transformer trained here (seconds on a CPU) on
random token runs repeated twice, at varied run lengths and starts — so that only induction (attend to the token
after the earlier occurrence of the current token), not a fixed position offset, predicts the second copy.
`analysis.head_summary` must then name a previous-token head in layer 0 (``prev``) and an induction head in
layer 1 (``induction``), at every repeat length tested.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlens import analysis
from attnlens import nn as alnn

VOCAB, N, DIM, HEADS = 32, 40, 32, 2


class AttnOnly(torch.nn.Module):
    """Token + position embeddings, two causal attention layers on the residual stream, an unembedding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Embedding(N, DIM)
        self.attn = torch.nn.ModuleList([alnn.MultiHeadAttention(DIM, HEADS, causal=True) for _ in range(2)])
        self.out = torch.nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        for a in self.attn:
            x = x + a(x)
        return self.out(x)


def batch(gen, size, lengths=None):
    """Random prefix, then a run of L random tokens twice (L drawn from ``lengths``); the loss mask marks the
    second copy's predictable tokens."""
    ids = torch.randint(0, VOCAB, (size, N), generator=gen)
    mask = torch.zeros(size, N, dtype=torch.bool)
    Ls = torch.tensor(lengths)[torch.randint(0, len(lengths), (size,), generator=gen)]
    for b, L in enumerate(Ls.tolist()):
        start = int(torch.randint(0, N - 2 * L + 1, (1,), generator=gen))
        ids[b, start + L:start + 2 * L] = ids[b, start:start + L]
        mask[b, start + L:start + 2 * L - 1] = True  # predicting token t+1 of the second copy from token t
    return ids, mask


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = AttnOnly()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_lengths = list(range(4, 19))
    for _ in range(800):
        ids, mask = batch(gen, 32, train_lengths)
        logits = model(ids)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[mask[:, :-1]], ids[:, 1:][mask[:, :-1]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), gen


@pytest.mark.parametrize("L", [5, 9, 16])
def test_head_scores_name_the_previous_token_and_induction_heads(trained, L):
    model, gen = trained
    ids, mask = batch(gen, 8, [L])
    with torch.no_grad():
        logits = model(ids)[:, :-1]
        acc = (logits.argmax(-1) == ids[:, 1:])[mask[:, :-1]].float().mean()
        with alnn.capture(model) as cap:
            model(ids)
    assert acc > 0.8, f"the model did not learn to copy the second run (accuracy {acc:.2f})"
    l0, l1 = cap.results
    prev = np.mean([analysis.head_summary(l0, ids, batch=b).prev for b in range(8)], axis=0)  # (H,)
    ind = np.mean([analysis.head_summary(l1, ids, batch=b).induction for b in range(8)], axis=0)
    ind0 = np.mean([analysis.head_summary(l0, ids, batch=b).induction for b in range(8)], axis=0)
    assert prev.max() > 0.5, f"no previous-token head in layer 0: prev = {prev}"
    assert ind.max() > 0.5, f"no induction head in layer 1: induction = {ind}"
    assert ind.max() > 2 * ind0.max(), "layer 0 cannot do induction (it has no previous-token information yet)"


def test_head_kinds_and_the_terminal_summary_name_the_circuit(trained):
    """`report.from_records(..., input_ids=)` carries the token ids to the head scores, `analysis.head_kinds` labels
    the layer-0 previous-token head and exactly the layer-1 heads with an induction score past the threshold, and
    `explain_summary` prints them in its kinds table."""
    import io

    from rich.console import Console

    from attnlens import Lens, report
    from attnlens.faces.cli import explain_summary

    model, gen = trained
    ids, _ = batch(gen, 2, [9])
    with torch.no_grad(), alnn.capture(model, lens=Lens(topk=4)) as cap:
        model(ids)
    b = 1
    toks = [str(t) for t in ids[b].tolist()]
    data = report.from_records(cap.results, toks, batch=b, input_ids=ids[b], model_name="induction toy")
    kinds = [analysis.head_kinds(s, data.n) for s in data.summaries]
    named = {kind: {(li, h) for li, row in enumerate(kinds) for h, (k, _) in enumerate(row) if k == kind}
             for kind in analysis.HEAD_KINDS}
    ind = data.summaries[1].induction  # (H,)
    assert ind.max() > 0.5 and (1, int(np.argmax(ind))) in named["induction"]
    assert named["induction"] == {(1, h) for h in range(HEADS) if ind[h] >= analysis.KIND_SCORE}
    prev0 = int(np.argmax(data.summaries[0].prev))
    assert (0, prev0) in named["previous-token"] and named["previous-token"] <= {(0, h) for h in range(HEADS)}
    plain = report.from_records(cap.results, toks, batch=b)  # no ids: no induction scores, so no induction heads
    assert not any(k == "induction" for s in plain.summaries for k, _ in analysis.head_kinds(s, plain.n))

    out = io.StringIO()
    explain_summary(Console(file=out, width=200), data)
    rows = {line.split()[0]: line for line in out.getvalue().split("Heads by kind")[1].splitlines()
            if line.strip().startswith(("induction", "previous-token"))}
    assert all(f"L{li} h{h} " in rows["induction"] for li, h in named["induction"])
    assert f"L0 h{prev0} " in rows["previous-token"]
    assert rows["induction"].split()[2] == str(len(named["induction"]))  # the count column
