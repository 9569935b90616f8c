"""`attnlens.analysis.head_kinds` (a name for each head from its exact scores) and the terminal summary of
`attnlens explain` built on it: the kinds grid and table, and the informative links (query → key weights between
real tokens, in heads that are not sinks, self or positional heads). The rules are checked on constructed
scores; MiniLM (skipped without the hf extra) must show its previous-token head and the README sentence's
"it → tired" link. The trained induction model is in tests/test_induction.py."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from attnlens import analysis, report
from attnlens.analysis import HeadSummary, head_kinds
from attnlens.faces.cli import explain_summary


def summary(H=1, **fields) -> HeadSummary:
    """A HeadSummary of ``H`` heads with no pattern (scores 0.1), entropy 1 nat, max weight 0.6; ``fields``
    override (scalars are broadcast to ``(H,)``; ``None`` stays ``None``)."""
    base = {"entropy": 1.0, "max_weight": 0.6, "first": 0.1, "self": 0.1, "prev": 0.1, "duplicate": None,
            "induction": None}
    base.update(fields)
    arr = {k: None if v is None else np.broadcast_to(np.asarray(v, dtype=np.float64), (H,)).copy()
           for k, v in base.items()}
    return HeadSummary(self_lo=arr["self"], self_hi=arr["self"], prev_lo=arr["prev"], prev_hi=arr["prev"], **arr)


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize("field, kind", [("induction", "induction"), ("duplicate", "duplicate"),
                                         ("prev", "previous-token"), ("self", "self"), ("first", "first-token sink")])
def test_each_pattern_kind_from_its_score(field, kind):
    got = head_kinds(summary(H=3, **{"duplicate": 0.0, "induction": 0.0, field: [0.5, 0.499, 0.93]}), 16)
    assert got[0] == (kind, 0.5)  # the threshold is inclusive
    assert got[1] == ("mixed", 0.6)  # just below it: nothing dominates
    assert got[2] == (kind, pytest.approx(0.93))


@pytest.mark.parametrize("fields, kind", [
    ({"induction": 0.6, "self": 0.6}, "induction"),  # induction's keys define the head: tried first
    ({"induction": 0.6, "duplicate": 0.7}, "induction"),
    ({"duplicate": 0.6, "prev": 0.9}, "duplicate"),
    ({"prev": 0.6, "self": 0.6}, "previous-token"),
    ({"prev": 0.6, "first": 0.6}, "previous-token"),
    ({"self": 0.6, "first": 0.9}, "self"),
])
def test_overlapping_patterns_follow_the_stated_order(fields, kind):
    assert head_kinds(summary(**{"duplicate": 0.0, "induction": 0.0, **fields}))[0][0] == kind


def test_without_token_ids_there_are_no_duplicate_or_induction_heads():
    s = summary(H=2, prev=[0.2, 0.7])
    assert s.duplicate is None and s.induction is None
    assert head_kinds(s) == [("mixed", 0.6), ("previous-token", 0.7)]
    # a field that is present alone still counts
    assert head_kinds(summary(induction=0.8))[0] == ("induction", 0.8)


def test_broad_from_the_entropy_fraction_or_a_small_largest_weight():
    n = 16
    edge = analysis.BROAD_ENTROPY * np.log(n)
    s = summary(H=4, entropy=[edge, edge - 1e-9, 0.5, edge], max_weight=[0.3, 0.3, 0.2, 0.3], prev=[0.1, 0.1, 0.1, 0.6])
    assert head_kinds(s, n) == [("broad", 0.3), ("mixed", 0.3), ("broad", 0.2), ("previous-token", 0.6)]
    # without n_tokens (or with one token) only the largest weight can tell
    assert [k for k, _ in head_kinds(s)] == ["mixed", "mixed", "broad", "previous-token"]
    assert [k for k, _ in head_kinds(s, 1)] == ["mixed", "mixed", "broad", "previous-token"]
    assert head_kinds(summary(max_weight=analysis.BROAD_MAX_WEIGHT))[0][0] == "mixed"  # strictly below


def test_nan_scores_never_apply():
    nan = float("nan")
    s = summary(H=2, entropy=nan, max_weight=nan, first=nan, self=nan, prev=[nan, 0.8], duplicate=nan, induction=nan)
    got = head_kinds(s, 8)
    assert got[0][0] == "mixed" and np.isnan(got[0][1])
    assert got[1] == ("previous-token", 0.8)


def test_positional_kinds_sinks_and_the_local_window():
    base = {"duplicate": 0.0, "induction": 0.0, "next": 0.1, "offset_score": 0.1, "offset": -3, "sink": 0.1,
            "sink_at": 7, "local": 0.3, "local_uniform": 0.2}
    for field, kind in [("next", "next-token"), ("offset_score", "offset"), ("sink", "sink")]:
        assert head_kinds(summary(**{**base, field: 0.7}))[0] == (kind, pytest.approx(0.7))
    s = summary(H=4, **{**base, "local": [0.6, 0.6, 0.49, 0.6], "local_uniform": [0.3, 0.41, 0.1, 0.39]})
    # local window: at least 0.5 and at least LOCAL_LIFT (1.5) times what a uniform row puts in the window
    assert [k for k, _ in head_kinds(s, 16)] == ["local window", "mixed", "mixed", "local window"]
    assert analysis.LOCAL_LIFT == 1.5 and head_kinds(s, 16)[0] == ("local window", pytest.approx(0.6))
    # the order: a sink before an offset (a sink's offset score can be large on a short text), a next-token head
    # before a sink, any pattern before the local window
    assert head_kinds(summary(**{**base, "sink": 0.6, "offset_score": 0.6}))[0][0] == "sink"
    assert head_kinds(summary(**{**base, "first": 0.6, "offset_score": 0.6}))[0][0] == "first-token sink"
    assert head_kinds(summary(**{**base, "next": 0.6, "sink": 0.6}))[0][0] == "next-token"
    assert head_kinds(summary(**{**base, "offset_score": 0.6, "local": 0.9}))[0][0] == "offset"
    labelled = summary(**{**base, "offset_score": 0.8})
    assert analysis.kind_label("offset", labelled, 0) == "offset -3"
    assert analysis.kind_label("sink", labelled, 0, [f"t{i}" for i in range(8)]) == "sink on t7 #7"
    assert analysis.kind_label("broad", labelled, 0) == "broad"


def test_links_of_positional_heads_are_left_out():
    """A local-window, offset or next-token head's links are routine; a mixed head's are not; asked for by layer,
    they come back."""
    idx = np.array([[[[3], [4], [5], [6], [0], [1], [2]]] * 4])  # (L=1, H=4, N=7, k=1): every query → query + 3
    w = np.full(idx.shape, 0.9)
    kinds = [[("local window", 0.6), ("offset", 0.9), ("next-token", 0.9), ("mixed", 0.9)]]
    links = analysis.informative_links(idx, w, TOKENS, kinds)
    assert links and all(heads == [(0.9, 0, 3)] for _, _, heads in links)
    assert all({h for _, _, h in heads} == {0, 1, 2, 3} for _, _, heads in
               analysis.informative_links(idx, w, TOKENS, kinds, layer=0))


def test_head_kinds_arguments():
    assert "head_kinds" in analysis.__all__ and set(analysis.HEAD_KINDS) >= {"broad", "mixed", "induction"}
    assert head_kinds(summary(H=0)) == []
    with pytest.raises(TypeError, match="summary"):
        head_kinds({"prev": np.ones(2)})
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_tokens"):
            head_kinds(summary(), bad)


# ---------------------------------------------------------------- the terminal summary, on made-up data

TOKENS = ["[CLS]", "a", "b", "c", "d", "e", "[SEP]"]


def made_up(k=3):
    """One layer, two heads: head 0 a first-token sink, head 1 mixed; each query's top-k set by hand."""
    from test_report import synthetic

    data = synthetic(TOKENS, L=1, H=2, k=k)
    idx = np.full((1, 2, len(TOKENS), k), -1)
    w = np.zeros((1, 2, len(TOKENS), k))

    def put(h, i, keys):
        for m, (j, x) in enumerate(keys):
            idx[0, h, i, m], w[0, h, i, m] = j, x

    put(0, 4, [(0, 0.6), (2, 0.35)])  # d → b, in the sink head
    put(1, 1, [(0, 0.7), (3, 0.3)])  # a → [CLS] (first token), a → c
    put(1, 3, [(2, 0.9), (4, 0.6), (1, 0.15)])  # c → b (previous), c → d (next), c → a: too weak
    put(1, 4, [(4, 0.5), (6, 0.3), (1, 0.2)])  # d → d (itself), d → [SEP] (special), d → a
    put(1, 5, [(1, 0.45), (2, 0.4)])  # e → a, e → b
    put(1, 6, [(1, 0.9)])  # [SEP] → a: a special query
    data.topk_idx, data.topk_w = idx, w
    data.summaries = [summary(H=2, first=[0.8, 0.1], entropy=[0.5, 0.9], max_weight=[0.8, 0.6])]
    data.model_name = "made-up"
    return data


def printed(data, **kw) -> str:
    from rich.console import Console

    out = io.StringIO()
    explain_summary(Console(file=out, width=200), data, **kw)
    return out.getvalue()


def link_rows(text: str) -> dict:
    """``{"a → c": "the whole row"}`` of the informative links table, in order."""
    part = text.split("Informative links")[1].split("Most attended token per token")[0]
    found = (re.match(r"\s*(\S+ → \S+)  ", line) for line in part.splitlines())
    return {m.group(1): m.string for m in found if m and m.group(1) != "query → key"}


def kind_row(text: str, kind: str) -> str:
    part = text.split("Heads by kind")[1].split("Informative links")[0]
    return next(line for line in part.splitlines() if line.strip().startswith(kind))


def test_summary_lists_kinds_and_only_informative_links():
    text = printed(made_up())
    assert "most focused" not in text and "Most attended token per token" not in text
    assert "Most received attention" in text
    assert "L0  F ·" in text  # the grid: head 0 a sink, head 1 mixed
    assert "L0 h0 0.80" in kind_row(text, "first-token sink") and "L0 h1 0.60" in kind_row(text, "mixed")
    assert "need the token ids" in text  # no duplicate / induction scores
    rows = link_rows(text)
    assert list(rows) == ["e → a", "e → b", "a → c", "d → a"]  # strongest first
    assert "0.45" in rows["e → a"] and "L0 h1" in rows["e → a"]


def test_layer_and_head_bring_back_the_routine_heads_and_the_token_table():
    text = printed(made_up(), layer=0)
    assert "d → b" in link_rows(text)  # the sink head's link, asked for
    table = text.split("Most attended token per token")[1]
    assert "L0 h1 (mixed)" in table and "L0 h0 (first-token sink)" in table
    text = printed(made_up(), layer=0, head=0)
    assert list(link_rows(text)) == ["d → b"]
    assert "L0 h0 (first-token sink)" in text.split("Most attended token per token")[1]


def test_summary_without_links_says_so():
    data = made_up()
    data.topk_w = data.topk_w * 0.1  # every weight under LINK_MIN
    assert "informative links: none" in printed(data)


# ---------------------------------------------------------------- from_records(input_ids=...)


def test_from_records_takes_the_token_ids():
    from attnlens import Lens
    from attnlens import nn as alnn

    torch.manual_seed(0)
    attn = alnn.MultiHeadAttention(8, 2, causal=True)
    ids = torch.tensor([[3, 5, 7, 3, 5, 7], [1, 2, 1, 2, 1, 2]])
    with torch.no_grad(), alnn.capture(attn, lens=Lens(topk=2)) as cap:
        attn(torch.randn(2, 6, 8))
    toks = [str(t) for t in ids[1].tolist()]
    plain = report.from_records(cap.results, toks, batch=1)
    assert plain.summaries[0].induction is None
    for given in (ids, ids[1], ids[1].tolist(), ids.numpy()):
        data = report.from_records(cap.results, toks, batch=1, input_ids=given)
        want = analysis.head_summary(cap.results[0], ids, batch=1)
        np.testing.assert_allclose(data.summaries[0].induction, want.induction)
        np.testing.assert_allclose(data.summaries[0].duplicate, want.duplicate)
    with pytest.raises(ValueError, match=r"input_ids: .*\(6,\).*got shape \(5,\)"):
        report.from_records(cap.results, toks, batch=1, input_ids=ids[1, :5])
    with pytest.raises(ValueError, match="input_ids"):
        report.from_records(cap.results, toks, batch=1, input_ids=ids[:1])  # no sequence 1
    with pytest.raises(ValueError, match="input_ids"):
        report.from_records(cap.results, toks, batch=1, input_ids=ids[None])
    with pytest.raises(TypeError, match="input_ids: expected integer"):
        report.from_records(cap.results, toks, batch=1, input_ids=ids[1].float())


# ---------------------------------------------------------------- MiniLM

README_SENTENCE = "The animal didn't cross the street because it was too tired."


@pytest.fixture(scope="module")
def minilm_data(minilm):
    model, tok = minilm
    return report.collect(README_SENTENCE, model, tok)


def test_minilm_kinds(minilm_data):
    data = minilm_data
    kinds = [head_kinds(s, data.n) for s in data.summaries]
    where = {kind: [(li, h) for li, row in enumerate(kinds) for h, (k, _) in enumerate(row) if k == kind]
             for kind in analysis.HEAD_KINDS}
    assert where["previous-token"] == [(0, 2)] and kinds[0][2][1] > 0.95
    assert where["next-token"] == [(1, 8)]
    assert where["local window"] == [(0, 4), (0, 5), (1, 2), (1, 4), (2, 8)]
    assert sum(k == "broad" for k, _ in kinds[0]) >= 8  # the first layer spreads its weight
    assert len(where["first-token sink"]) >= 20 and all(li > 0 for li, _ in where["first-token sink"])
    assert not where["induction"] and not where["duplicate"] and not where["self"]


def test_minilm_summary_shows_it_looks_at_tired(minilm_data):
    text = printed(minilm_data)
    assert kind_row(text, "previous-token").split() == ["previous-token", "P", "1", "L0", "h2", "1.00"]
    rows = link_rows(text)
    assert "it → tired" in rows and "L2 h3 0.61" in rows["it → tired"]  # L2 h1 has it more strongly (0.71)
    assert "it → animal" in rows
    assert "t → didn" not in rows and "the → didn" not in rows  # local-window heads' links: positional
    assert not any(k.startswith(("[CLS]", "[SEP]")) or k.endswith(("[CLS]", "[SEP]")) for k in rows)
