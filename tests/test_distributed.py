"""Ring attention (`attnlens.distributed`) in real gloo process groups on 127.0.0.1.

Each spawned run starts ``world`` processes once and checks many cases in them (process start-up
dominates the cost). The parent writes the full inputs, the ranks write their shards of the
output, lens and gradients, and the parent compares the unsharded results with single-process
``attnlens.attention`` (and top-k with the float64 reference) in float64, to 1e-8.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close, check_topk, reference

import attnlens as al
from attnlens.distributed import chunk_sizes, ring_attention, shard, unshard

TOL = 1e-8
#: a spawned run that takes longer than this fails (and its processes are killed)
RUN_TIMEOUT = 60.0
#: the process group timeout inside the spawned ranks: a stuck transfer fails after this
PG_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------------------
# launching ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, job, outdir):
    """Entry point of a spawned rank: join the group, run ``job``, record success or the traceback."""
    torch.set_num_threads(1)
    status = os.path.join(outdir, f"rank{rank}.status")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=JOB_PG_TIMEOUT.get(job, PG_TIMEOUT)))
        JOBS[job](rank, world, outdir)
        with open(status, "w") as f:
            f.write("ok")
    except BaseException:
        with open(status, "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group after a failure test
                pass


def launch(world, job, outdir, expect_fail=()):
    """Run ``job`` on ``world`` spawned ranks; return ``{rank: status text}``. Fails the test if a run
    exceeds RUN_TIMEOUT or a rank not in ``expect_fail`` did not finish with "ok"."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, str(outdir)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + RUN_TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    status = {}
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.status")
        status[r] = open(path).read() if os.path.exists(path) else f"(no status; exit code {procs[r].exitcode})"
    if hung:
        pytest.fail(f"ranks {hung} of {job} still running after {RUN_TIMEOUT}s (hang); statuses: {status}")
    bad = {r: s for r, s in status.items() if s != "ok" and r not in expect_fail}
    if bad:
        pytest.fail(f"{job}: ranks failed:\n" + "\n".join(f"--- rank {r}\n{s}" for r, s in bad.items()))
    return status


# ------------------------------------------------------------------------------------------------
# exactness cases: (world, B, Hq, Hkv, Nq, Nk, D, Dv, kwargs, q lengths per rank | None, k lengths | None)

LENS = al.Lens(lse=True, max_weight=True, entropy=True, received=True, topk=5)

CASES = {
    # world 3
    "plain-gqa-uneven": (3, 2, 4, 2, 23, 23, 5, 3, {}, [4, 12, 7], [4, 12, 7]),
    "causal-uneven": (3, 1, 2, 2, 29, 29, 4, 4, {"causal": True}, [13, 3, 13], [13, 3, 13]),
    "causal-cross-Nq<Nk": (3, 1, 2, 1, 14, 31, 4, 2, {"causal": True}, [3, 6, 5], [11, 9, 11]),
    "window-uneven": (3, 1, 2, 2, 26, 26, 3, 3, {"window": (3, 2)}, [10, 5, 11], [10, 5, 11]),
    "causal-window-zigzag": (3, 1, 2, 1, 27, 27, 4, 4, {"causal": True, "window": (4, None), "layout": "zigzag"},
                             None, None),
    "zigzag-noncausal": (3, 2, 2, 2, 25, 25, 3, 5, {"layout": "zigzag", "scale": 0.7}, None, None),
    # world 3, padded batches (seqlens_q / seqlens_k of the whole sequences; lengths 0 included)
    "varlen-causal-uneven": (3, 3, 2, 1, 23, 23, 4, 3, {"causal": True, "seqlens_q": [23, 10, 0],
                                                        "seqlens_k": [15, 23, 7]}, [4, 12, 7], [4, 12, 7]),
    "varlen-causal-Nq<Nk": (3, 2, 2, 2, 14, 31, 4, 2, {"causal": True, "seqlens_q": [14, 6], "seqlens_k": [31, 9]},
                            [3, 6, 5], [11, 9, 11]),
    "varlen-window-zigzag": (3, 2, 2, 1, 27, 27, 3, 3, {"window": (3, 2), "layout": "zigzag", "seqlens_q": [27, 5],
                                                        "seqlens_k": [20, 27]}, None, None),
    # world 4
    "zigzag-causal-4": (4, 1, 4, 2, 37, 37, 4, 4, {"causal": True, "layout": "zigzag"}, None, None),
    "contiguous-causal-4": (4, 1, 2, 2, 22, 22, 3, 3, {"causal": True}, [1, 9, 2, 10], [1, 9, 2, 10]),
    "window-zigzag-4": (4, 1, 1, 1, 40, 40, 4, 4, {"window": 3, "layout": "zigzag"}, None, None),
}


def _inputs(name):
    world, B, Hq, Hkv, Nq, Nk, D, Dv, kw, lq, lk = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64)
    do = torch.randn(B, Hq, Nq, Dv, generator=g, dtype=torch.float64)
    return q, k, v, do


def _cut(x, rank, world, layout, lengths):
    return torch.split(x, lengths, dim=-2)[rank] if lengths is not None else shard(x, rank, world, layout)


def job_exact(rank, world, outdir):
    for name, (w, *_, kw, lq, lk) in CASES.items():
        if w != world:
            continue
        q, k, v, do = _inputs(name)
        layout = kw.get("layout", "contiguous")
        qs, ks, vs = (_cut(x, rank, world, layout, n).clone().requires_grad_() for x, n in ((q, lq), (k, lk), (v, lk)))
        out, res = ring_attention(qs, ks, vs, lens=LENS, **kw)
        do_l = _cut(do, rank, world, layout, lq)
        _loss(out, res.lse, do_l).backward()  # through the output and the (global) lse
        torch.save({"out": out.detach(), "lse": res.lse.detach(), "max_weight": res.max_weight, "entropy": res.entropy,
                    "received": res.received, "topk_weights": res.topk_weights, "topk_indices": res.topk_indices,
                    "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}, os.path.join(outdir, f"{name}.{rank}.pt"))
        # no lens, no grad: the plain path gives the same output
        with torch.no_grad():
            out2 = ring_attention(qs, ks, vs, **kw)
        assert torch.equal(out2, out.detach()) or (out2 - out).abs().max() < 1e-12


def _loss(out, lse, do):
    """Σ out·dO + Σ lse·g with g = 0.3·dO[..., 0] on the rows that see a key: a loss on the output and the lse."""
    return (out * do).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * 0.3 * do[..., 0]).sum()


def _check_world(world, tmp_path):
    launch(world, "exact", tmp_path)
    names = [n for n, c in CASES.items() if c[0] == world]
    for name in names:
        _, *_, kw, lq, lk = CASES[name]
        layout = "contiguous" if lq is not None else kw.get("layout", "contiguous")
        parts = [torch.load(tmp_path / f"{name}.{r}.pt") for r in range(world)]
        got = {key: unshard([p[key] for p in parts], layout, dim=-2 if key in ("out", "dq", "dk", "dv", "topk_weights",
                                                                                "topk_indices") else -1)
               for key in parts[0]}
        q, k, v, do = (x.clone().requires_grad_() for x in _inputs(name))
        akw = {key: val for key, val in kw.items() if key != "layout"}
        out, res = al.attention(q, k, v, lens=LENS, backend="torch", **akw)
        _loss(out, res.lse, do).backward()
        what = f"{name} (world {world})"
        assert_close(got["out"], out.detach(), atol=TOL, what=f"{what}: out")
        for key in ("lse", "max_weight", "entropy", "received"):
            e, a = getattr(res, key), got[key]
            if key == "lse":  # -inf rows must match exactly
                assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: lse -inf rows"
                a, e = torch.where(torch.isinf(a), 0, a), torch.where(torch.isinf(e), 0, e)
            assert_close(a, e, atol=TOL, what=f"{what}: {key}")
        assert_close(got["topk_weights"], res.topk_weights, atol=TOL, what=f"{what}: topk_weights")
        assert torch.equal(got["topk_indices"], res.topk_indices), f"{what}: global top-k indices"
        if "seqlens_q" not in akw:  # a padded batch's top-k: checked against attention() above (oracle: test_varlen)
            _, ref = reference(q, k, v, topk=LENS.topk, **akw)
            check_topk(type(res)(topk_weights=got["topk_weights"], topk_indices=got["topk_indices"]), ref, atol=TOL)
        for key, t in (("dq", q), ("dk", k), ("dv", v)):
            assert_close(got[key], t.grad, atol=TOL, what=f"{what}: {key}")


def test_ring_world3_exact(tmp_path):
    """Output, every lens field and the gradients equal single-process attention: causal and not,
    uneven shards, Nq != Nk, GQA, windows, zigzag — 3 ranks."""
    _check_world(3, tmp_path)


def test_ring_world4_exact(tmp_path):
    """The same with 4 ranks: zigzag causal (balanced), uneven contiguous shards, zigzag window."""
    _check_world(4, tmp_path)


# ------------------------------------------------------------------------------------------------
# failures: every rank raises a clear error, none hangs


def job_bad_calls(rank, world, outdir):
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 4 if rank == 0 else 5, dtype=torch.float64)  # rank 1: wrong head dim
    v = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    msgs = []
    with pytest.raises(ValueError) as e:
        ring_attention(q, k, v)
    msgs.append(str(e.value))
    k = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError) as e:  # ranks disagree on causal
        ring_attention(q, k, v, causal=rank == 1)
    msgs.append(str(e.value))
    with pytest.raises(ValueError) as e:  # not a zigzag cut
        ring_attention(q[:, :, :3 + 2 * rank], k[:, :, :3 + 2 * rank], v[:, :, :3 + 2 * rank], layout="zigzag")
    msgs.append(str(e.value))
    with pytest.raises(ValueError) as e:  # ranks disagree on the lens: named fields, not internal codes
        ring_attention(q, k, v, lens=al.Lens(entropy=False, received=False) if rank == 0 else None)
    msgs.append(str(e.value))
    with pytest.raises(ValueError) as e:  # ranks disagree on a padded batch's lengths
        ring_attention(q, k, v, causal=True, seqlens_q=[12 - rank], seqlens_k=[12])
    msgs.append(str(e.value))
    with pytest.raises(ValueError) as e:  # rank 0's key length is beyond the whole sequence (12 keys)
        ring_attention(q, k, v, seqlens_k=[13 if rank == 0 else 12])
    msgs.append(str(e.value))
    # the group still works after all that
    out = ring_attention(q, k, v, causal=True)
    assert out.shape == (1, 2, 6, 4)
    with open(os.path.join(outdir, f"msgs{rank}.txt"), "w") as f:
        f.write("\n".join(msgs))


def job_rank1_crashes(rank, world, outdir):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    q = torch.randn(1, 1, 8, 4)
    t0 = time.monotonic()
    try:
        ring_attention(q, q, q, causal=True)
    except RuntimeError as e:
        with open(os.path.join(outdir, "crash0.txt"), "w") as f:
            f.write(f"{time.monotonic() - t0:.1f}\n{e}")
        return
    raise AssertionError("ring_attention returned although rank 1 had failed")


def job_rank1_hangs(rank, world, outdir):
    """Rank 1 raises, catches it and stays alive without joining the call (the worst case: no
    connection closes); rank 0 must fail once the process group's timeout expires."""
    if rank == 1:
        try:
            raise RuntimeError("rank 1 fails on purpose and carries on")
        except RuntimeError:  # stay alive (connections open) until rank 0 has given up, at most 20 s
            t0 = time.monotonic()
            while not os.path.exists(os.path.join(outdir, "hang0.txt")) and time.monotonic() - t0 < 20:
                time.sleep(0.1)
        return
    q = torch.randn(1, 1, 8, 4)
    t0 = time.monotonic()
    try:
        ring_attention(q, q, q)
    except RuntimeError as e:
        with open(os.path.join(outdir, "hang0.txt"), "w") as f:
            f.write(f"{time.monotonic() - t0:.1f}\n{e}")
        return
    raise AssertionError("ring_attention returned although rank 1 never called it")


def _triton_inputs():
    g = torch.Generator().manual_seed(77)
    B, Hq, Hkv, N, D = 1, 2, 1, 37, 16
    q, k, v, do = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hkv, Hkv, Hq))
    return q, k, v, do


TRITON_LENS = al.Lens(topk=3)
TRITON_KW = {"causal": True, "window": (20, None), "layout": "zigzag"}


def job_triton(rank, world, outdir):
    """The ring on the Triton kernels (interpreter): every pass must launch Triton kernels, none may run the
    chunked torch backend's code."""
    os.environ["TRITON_INTERPRET"] = "1"
    from attnlens.core.backends import torch_chunked
    from attnlens.core.backends.triton import ops

    def boom(*a, **k):
        raise AssertionError("the chunked torch backend ran during a Triton ring")

    for name in ("forward", "backward", "column_sums", "_Chunk", "_prepare"):
        setattr(torch_chunked, name, boom)
    launched = []
    orig = ops._launch
    ops._launch = lambda name, *a, **k: (launched.append(name), orig(name, *a, **k))[1]
    q, k, v, do = _triton_inputs()
    qs, ks, vs = (shard(x, rank, world, "zigzag").clone().requires_grad_() for x in (q, k, v))
    be = al.TritonBackend(config="16x16")
    out, res = ring_attention(qs, ks, vs, lens=al.Lens(topk=3), backend=be, **TRITON_KW)
    out.backward(shard(do, rank, world, "zigzag"))
    torch.save({"out": out.detach(), "lse": res.lse, "max_weight": res.max_weight, "entropy": res.entropy,
                "received": res.received, "topk_weights": res.topk_weights, "topk_indices": res.topk_indices,
                "dq": qs.grad, "dk": ks.grad, "dv": vs.grad, "launched": sorted(set(launched))},
               os.path.join(outdir, f"triton.{rank}.pt"))


JOBS = {"exact": job_exact, "bad_calls": job_bad_calls, "rank1_crashes": job_rank1_crashes,
        "rank1_hangs": job_rank1_hangs, "triton": job_triton}
#: shorter process-group timeouts for jobs that wait for one to expire
JOB_PG_TIMEOUT = {"rank1_hangs": 3.0}


def test_bad_calls_raise_on_every_rank(tmp_path):
    """A rank with bad inputs, or ranks that disagree, make *every* rank raise ValueError (no hang)."""
    launch(2, "bad_calls", tmp_path)
    m0, m1 = ((tmp_path / f"msgs{r}.txt").read_text().split("\n") for r in range(2))
    assert "head dims disagree" in m1[0]
    assert "rank(s) [1] rejected their inputs" in m0[0]
    assert "ranks disagree on causal" in m0[1] and "ranks disagree on causal" in m1[1]
    assert "zigzag" in m0[2] and "chunks" in m0[2] and m0[2] == m1[2]
    assert "ranks disagree on lens ({0: 'Lens(lse, max_weight)', 1: 'None'}" in m0[3], m0[3]
    assert "ranks disagree on (seqlens_q, seqlens_k) ({0: ([12], [12]), 1: ([11], [12])}" in m0[4] and m0[4] == m1[4]
    assert "seqlens_k must lie in [0, 12]" in m0[5] and "rank(s) [0] rejected seqlens_q / seqlens_k" in m1[5]


@pytest.mark.triton
def test_ring_on_triton_runs_all_three_passes_on_triton(tmp_path):
    """backend=TritonBackend (interpreter, 2 gloo ranks, zigzag, causal window, GQA): forward, received and backward
    launch Triton kernels only, and outputs, lens and gradients equal single-process attention."""
    launch(2, "triton", tmp_path)
    parts = [torch.load(tmp_path / f"triton.{r}.pt") for r in range(2)]
    for p in parts:
        assert p["launched"] == ["attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_bwd_preprocess_kernel",
                                 "attn_fwd_kernel", "attn_received_kernel"], p["launched"]
    q, k, v, do = (x.clone().requires_grad_() for x in _triton_inputs())
    akw = {key: val for key, val in TRITON_KW.items() if key != "layout"}
    out, res = al.attention(q, k, v, lens=TRITON_LENS, backend="torch", **akw)
    out.backward(do)
    dims = {"out": -2, "dq": -2, "dk": -2, "dv": -2, "topk_weights": -2, "topk_indices": -2}
    got = {key: unshard([p[key] for p in parts], "zigzag", dim=dims.get(key, -1)) for key in dims.keys() | {
        "lse", "max_weight", "entropy", "received"}}
    assert_close(got["out"], out.detach(), atol=2e-5, what="out")
    for key in ("lse", "max_weight", "entropy", "received", "topk_weights"):
        assert_close(got[key], getattr(res, key), atol=5e-5, what=key)
    assert torch.equal(got["topk_indices"], res.topk_indices)
    for key, t in (("dq", q), ("dk", k), ("dv", v)):
        assert_close(got[key], t.grad, atol=1e-4, what=key)


def test_distributed_imports_no_backend():
    """Ring attention reaches backends only through the seam (dispatch + block primitives)."""
    import ast
    import inspect

    import attnlens.distributed as d

    tree = ast.parse(inspect.getsource(d))
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if "_backends" in m or "torch_chunked" in m or "triton" in m], mods


def test_failed_rank_fails_the_others(tmp_path):
    """A rank that raises (and exits) makes the ring fail on the others with a clear RuntimeError, in time."""
    status = launch(2, "rank1_crashes", tmp_path, expect_fail=(1,))
    assert "rank 1 fails on purpose" in status[1]
    secs, msg = (tmp_path / "crash0.txt").read_text().split("\n", 1)
    assert "ring_attention: rank 0 of 2" in msg, msg
    assert float(secs) <= PG_TIMEOUT + 5


def test_silent_rank_times_out_the_others(tmp_path):
    """A rank that never joins the call (but keeps its connections open) fails the others with a clear
    RuntimeError after the process group's timeout, not a hang."""
    launch(2, "rank1_hangs", tmp_path)
    secs, msg = (tmp_path / "hang0.txt").read_text().split("\n", 1)
    assert "ring_attention: rank 0 of 2" in msg and "timeout" in msg, msg
    assert JOB_PG_TIMEOUT["rank1_hangs"] - 0.5 <= float(secs) <= JOB_PG_TIMEOUT["rank1_hangs"] + 10


# ------------------------------------------------------------------------------------------------
# in-process: layouts and a group of one


def test_shard_unshard_roundtrip():
    x = torch.arange(2 * 23).reshape(1, 23, 2)
    for world in (1, 2, 3, 4, 5):
        for layout in ("contiguous", "zigzag"):
            parts = [shard(x, r, world, layout, dim=1) for r in range(world)]
            assert sum(p.shape[1] for p in parts) == 23
            assert torch.equal(unshard(parts, layout, dim=1), x)
    z = [shard(torch.arange(8), r, 2, "zigzag", dim=0).tolist() for r in range(2)]
    assert z == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="layout"):
        shard(x, 0, 2, "striped")
    with pytest.raises(ValueError, match="at least 3 positions"):  # empty shards, which the ring would refuse
        shard(torch.zeros(1, 2, 2), 0, 3, dim=1)
    with pytest.raises(ValueError, match="at least 6 positions"):
        shard(torch.zeros(5, 2), 1, 3, "zigzag", dim=0)


def test_no_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="init_process_group"):
        ring_attention(q, q, q)


def test_world_of_one_equals_attention():
    """A group of one rank (in this process): the ring degenerates to one block."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        for kw in ({"causal": True}, {"window": (2, 1)}, {"layout": "zigzag", "causal": True}):
            out, res = ring_attention(q, k, v, lens=LENS, **kw)
            akw = {key: val for key, val in kw.items() if key != "layout"}
            ref, rres = al.attention(q, k, v, lens=LENS, backend="torch", **akw)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            rgrads = torch.autograd.grad(ref.sum(), (q, k, v))
            assert_close(out.detach(), ref.detach(), atol=TOL, what=f"out {kw}")
            for key in ("entropy", "received", "max_weight", "topk_weights"):
                assert_close(getattr(res, key), getattr(rres, key), atol=TOL, what=f"{key} {kw}")
            for a, b in zip(grads, rgrads):
                assert_close(a, b, atol=TOL, what=f"grad {kw}")
        x = torch.randn(3, 7, 2)  # rank-3 input keeps its rank
        assert ring_attention(x, x, x).shape == (3, 7, 2)
        with pytest.raises(TypeError, match="torch.Tensor"):
            ring_attention(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((4, 2)))
        with pytest.raises(ValueError, match="Lens.rows"):
            ring_attention(x, x, x, lens=al.Lens(rows=[0]))
    finally:
        dist.destroy_process_group()
