"""Issue 20's quality benchmark: which KV-cache compression keeps what a small decoder needs to answer?

    python benchmarks/kv_quality.py [--steps 600] [--eval 400] [--context 128] [--window 16] [--out FILE] [--plot PNG]

The task (synthetic long-context retrieval, the question at the end): a context of ``--context`` filler tokens holds
``--pairs`` record tokens, each with a different key; ``? k`` asks for the record with key ``k``, and the answer is
that record's two value tokens ``va vb``. Which key and values a record token carries is a fixed table (64 records,
16 keys: four records share each key) that the model learns in training: the four records of a key come in two
pairs, a pair shares its ``va``, and each record has its own ``vb``. The context says which record of key ``k`` this
prompt holds, so both answer tokens need that record: without it ``va`` is a guess between two, and ``vb``, even
after the right ``va``, a guess between the two records of that pair (the record cannot be read off ``k`` and ``va``;
chance: 1/4 for both tokens, 1/2 for ``vb`` given ``va``)::

    f f r37 f f f ... f r5 f f ... f  ? k5   →   va(r37) vb(r37)        (key(r37) = 5)

Two settings, the answer generated greedily, counted when both tokens are right:

- ``in-prompt``: the prompt (context + question) is the prefill, scored and compressed by `attnlens.kv`; ``va``
  comes from the prefill's own logits (the full context), ``vb`` from the compressed cache (chance 1/2). The
  question's last token ``k`` must find the record to say ``va``, and it is in SnapKV's observation window and is
  TOVA's last query: query-aware compression.
- ``after`` (kvpress's pipeline): the context alone is the prefill, compressed; then ``? k`` and both answer tokens
  run on the compressed cache. The compression cannot know the question.

The model: a random Llama (2 layers, hidden 128, 4 query / 2 key-value heads, D = 32), trained here for ``--steps``
steps on the CPU on this task (teacher forcing, several questions per context, loss on the answers), once: the
weights are cached under ``~/.cache/attnlens/kv-quality`` (never in git), keyed by the settings.

Reported: accuracy at ratios 0, 0.25, 0.5, 0.75, 0.9 for every method of `attnlens.kv.METHODS` on ``--eval`` fresh
prompts (the same for every method), in both settings; what the caches keep (`keeps`: per layer, how often the asked
record, the first token and the question's tokens survive — the why behind the ranking); a Markdown table, a JSON
file and a matplotlib plot (FILE.md, .json, and ``--plot`` or FILE.png).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnlens import kv  # noqa: E402

RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)
#: where the question is: in the compressed prompt, or after the compressed context (kvpress's pipeline)
SETTINGS = {"in-prompt": "question in the prompt (compressed with it)",
            "after": "question after the compressed context"}
CACHE = Path(os.path.expanduser("~/.cache/attnlens/kv-quality"))
#: bumped when the task changes (the cached weights are keyed by it): 3 = a pair of records shares ``va``
TASK_VERSION = 3


@dataclass(frozen=True)
class Task:
    context: int = 128
    pairs: int = 8
    records: int = 64
    keys: int = 16
    values: int = 32
    filler: int = 32
    questions: int = 8  # per training sequence

    @property
    def vocab(self) -> int:
        return 3 + self.records + self.keys + self.values + self.filler

    # token ids: 0 pad, 1 bos, 2 "?", then records, keys, values, filler
    def record(self, i):
        return 3 + i

    def key(self, i):
        return 3 + self.records + i

    def value(self, i):
        return 3 + self.records + self.keys + i

    def fill(self, i):
        return 3 + self.records + self.keys + self.values + i

    def table(self) -> np.ndarray:
        """``(records, 3)``: each record token's key, ``va`` and ``vb`` — fixed (seed 0), learned by the model. Record
        ``r`` has key ``r % keys``; the records of a key, in order, pair up (the 1st and 2nd, the 3rd and 4th, ...):
        a pair shares ``va`` (the pairs of a key differ), and the records of a key all differ in ``vb``."""
        rng = np.random.default_rng(0)
        key = np.arange(self.records) % self.keys
        va = np.empty(self.records, dtype=np.int64)
        vb = np.empty(self.records, dtype=np.int64)
        for k in range(self.keys):
            mine = np.flatnonzero(key == k)
            vb[mine] = rng.choice(self.values, len(mine), replace=False)
            pair_va = rng.choice(self.values, (len(mine) + 1) // 2, replace=False)
            va[mine] = pair_va[np.arange(len(mine)) // 2]
        return np.stack([key, va, vb], 1)


def make_batch(task: Task, rng: np.random.Generator, n: int, questions: int):
    """``(ids (n, T), targets (n, T), answers (n, questions, 2))``: each row a context of filler holding
    ``task.pairs`` record tokens with distinct keys, then ``questions`` questions ``? k va vb``; targets hold the answer
    tokens at their places, -100 elsewhere."""
    tab = task.table()
    T = 1 + task.context + 4 * questions
    ids = np.zeros((n, T), dtype=np.int64)
    tgt = np.full((n, T), -100, dtype=np.int64)
    ans = np.zeros((n, questions, 2), dtype=np.int64)
    for r in range(n):
        ctx = task.fill(rng.integers(0, task.filler, task.context))
        keys = rng.choice(task.keys, task.pairs, replace=False)
        recs = keys + task.keys * rng.integers(0, task.records // task.keys, task.pairs)  # a record of each key
        ctx[rng.choice(task.context, task.pairs, replace=False)] = task.record(recs)
        row = [1] + ctx.tolist()
        for qi, p in enumerate(rng.choice(task.pairs, questions, replace=questions > task.pairs)):
            a, b = task.value(tab[recs[p], 1]), task.value(tab[recs[p], 2])
            row += [2, task.key(keys[p]), a, b]
            ans[r, qi] = (a, b)
        ids[r] = row
        for qi in range(questions):
            at = 1 + task.context + 4 * qi
            tgt[r, at + 2: at + 4] = ids[r, at + 2: at + 4]
    return torch.tensor(ids), torch.tensor(tgt), ans


def build(task: Task, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=task.vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * task.context + 64,
                      bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def train(task: Task, steps: int, batch: int, lr: float, seed: int, log_every: int = 100):
    model = build(task, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    log = []
    for step in range(steps):
        ids, tgt, _ = make_batch(task, rng, batch, task.questions)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                pred = logits[:, :-1].argmax(-1)
                m = tgt[:, 1:] != -100
                acc = float((pred[m] == tgt[:, 1:][m]).float().mean())
            log.append({"step": step, "loss": float(loss.detach()), "token_acc": acc, "seconds": time.perf_counter() - t0})
            print(json.dumps(log[-1]), flush=True)
    return model.eval(), log


def load_or_train(task: Task, steps: int, batch: int, lr: float, seed: int):
    key = hashlib.sha256(json.dumps([TASK_VERSION, asdict(task), steps, batch, lr, seed]).encode()).hexdigest()[:16]
    path = CACHE / f"model-{key}.pt"
    model = build(task, seed)
    if path.exists():
        blob = torch.load(path, map_location="cpu")
        model.load_state_dict(blob["state"])
        return model.eval(), blob["log"], str(path)
    model, log = train(task, steps, batch, lr, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "log": log}, path)
    return model, log, str(path)


def evaluate(model, task: Task, n: int, method: str, ratio: float, window: int, setting: str = "in-prompt",
             batch: int = 100, seed: int = 1234):
    """Accuracy on ``n`` prompts: both answer tokens right, greedy. ``setting``: ``"in-prompt"`` — the prefill is the
    context and the question ``? k`` (the question is in SnapKV's observation window and is TOVA's last query); ``va``
    comes from the prefill's logits, ``vb`` from the compressed cache — or ``"after"`` (kvpress's pipeline): the
    context alone is prefilled and compressed, then ``? k`` and both answer tokens run on the compressed cache."""
    from transformers import DynamicCache

    rng = np.random.default_rng(seed)
    right = 0
    for a in range(0, n, batch):
        ids, _, ans = make_batch(task, rng, min(batch, n - a), 1)
        prompt = ids[:, : 1 + task.context + 2]  # up to "? k"
        with torch.no_grad(), kv.compress(model, method=method, ratio=ratio, window=window):
            kw = {}
            if setting == "after":
                kw["cache"] = DynamicCache(config=model.config)
                model(input_ids=prompt[:, : 1 + task.context], cache=kw["cache"], use_cache=True)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2,
                                 do_sample=False, pad_token_id=0, **kw)
        got = out[:, prompt.shape[1]:].numpy()
        right += int((got == ans[:, 0]).all(1).sum())
    return right / n


#: (method, ratio) pairs whose kept keys `keeps` reports
KEEPS = (("h2o", 0.5), ("snapkv", 0.5), ("snapkv", 0.9), ("tova", 0.9), ("streamingllm", 0.5), ("knorm", 0.25))


def keeps(model, task: Task, n: int, window: int, seed: int = 1234) -> list:
    """Why the methods differ: on the first ``n`` in-prompt prompts of `evaluate`, for each (method, ratio) of `KEEPS`
    and each layer, the fraction of (prompt, KV head) whose kept keys include the asked record, the first token
    (``bos``), and the question's ``?`` and ``k`` (the prompt's last two tokens) — from `attnlens.kv.scores`, which
    keeps what `compress` keeps."""
    rng = np.random.default_rng(seed)
    ids, _, _ = make_batch(task, rng, n, 1)
    prompt = ids[:, : 1 + task.context + 2]
    N = prompt.shape[1]
    tab = task.table()
    ctx = prompt[:, 1: 1 + task.context].numpy() - task.record(0)
    asked = prompt[:, -1].numpy() - task.key(0)
    is_rec = (ctx >= 0) & (ctx < task.records)
    hit = is_rec & (tab[ctx.clip(0, task.records - 1), 0] == asked[:, None])
    rec = torch.tensor(1 + hit.argmax(1))  # each prompt's asked record (exactly one)
    rows = []
    for method, ratio in KEEPS:
        with torch.no_grad():
            layers = kv.scores(model, prompt, method=method, ratio=ratio, window=window)
        for ls in layers:
            kept = ls.kept().float()  # (n, Hkv, N)
            rows.append({"method": method, "ratio": ratio, "layer": ls.layer,
                         "record": float(kept[torch.arange(n), :, rec].mean()), "bos": float(kept[:, :, 0].mean()),
                         "?": float(kept[:, :, N - 2].mean()), "k": float(kept[:, :, N - 1].mean())})
    return rows


def plot(results, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(11, 4.0), dpi=110, sharey=True)
    for ax, setting in zip(axes, SETTINGS):
        for method in kv.METHODS:
            rows = [r for r in results if r["method"] == method and r["setting"] == setting]
            ax.plot([r["ratio"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=method)
        ax.set_xlabel("compression ratio (fraction of the KV cache evicted)")
        ax.set_xticks(RATIOS)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(SETTINGS[setting], fontsize=9)
    axes[0].set_ylabel("answer accuracy")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--window", type=int, default=16, help="SnapKV / PyramidKV observation window")
    ap.add_argument("--out", default=None, help="write FILE.md and FILE.json (and FILE.png unless --plot)")
    ap.add_argument("--plot", default=None, help="write the plot here (PNG) instead of FILE.png")
    args = ap.parse_args(argv)
    task = Task(context=args.context, pairs=args.pairs)
    t0 = time.perf_counter()
    model, log, path = load_or_train(task, args.steps, args.batch, args.lr, args.seed)
    trained = time.perf_counter() - t0
    print(f"model: {path} ({trained:.0f} s)", flush=True)
    results = []
    for setting in SETTINGS:
        for method in kv.METHODS:
            for ratio in RATIOS:
                acc = evaluate(model, task, args.eval, method, ratio, args.window, setting)
                results.append({"setting": setting, "method": method, "ratio": ratio, "accuracy": acc})
                print(json.dumps(results[-1]), flush=True)
    day = datetime.date.today().isoformat()
    n_prompt = 1 + task.context + 2
    md = [f"# KV-cache compression on a retrieval task (issue 20's quality benchmark), {day}", "",
          f"Command: `python benchmarks/kv_quality.py --context {args.context} --pairs {args.pairs} --steps {args.steps} "
          f"--batch {args.batch} --lr {args.lr} --seed {args.seed} --eval {args.eval} --window {args.window}"
          + (f" --out {args.out}" if args.out else "") + (f" --plot {args.plot}" if args.plot else "") + "`", "",
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
          f"Model: Llama, 2 layers, hidden 128, 4 query / 2 KV heads (D = 32), trained {args.steps} steps "
          f"(batch {args.batch}) in {log[-1]['seconds']:.0f} s; final training answer-token accuracy "
          f"{log[-1]['token_acc']:.3f}. Prompts: {n_prompt} tokens ({args.pairs} record tokens in "
          f"{args.context} tokens of filler, then `? k`); {args.eval} prompts per cell, the same for every method; "
          f"SnapKV/PyramidKV window {args.window}, kernel 5; StreamingLLM 4 sinks. Without the asked record in the "
          f"cache the answer is a guess: 1/2 in-prompt (``va`` comes from the full prefill), 1/4 after.", "",
          "| setting | method | " + " | ".join(f"ratio {r}" for r in RATIOS) + " |", "|---|---|" + "---|" * len(RATIOS)]
    for setting in SETTINGS:
        for method in kv.METHODS:
            accs = [r["accuracy"] for r in results if r["method"] == method and r["setting"] == setting]
            md.append(f"| {setting} | {method} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    kept = keeps(model, task, min(args.eval, 200), args.window)
    md += ["", f"What the caches keep (in-prompt, the first {min(args.eval, 200)} prompts): the fraction of (prompt, "
           f"KV head) whose layer keeps the asked record, the first token, and the question's `?` and `k`.", "",
           "| method | ratio | layer | record | first token | `?` | `k` |", "|---|---|---|---|---|---|---|"]
    for r in kept:
        md.append(f"| {r['method']} | {r['ratio']} | {r['layer']} | {r['record']:.2f} | {r['bos']:.2f} | "
                  f"{r['?']:.2f} | {r['k']:.2f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "train_log": log, "results": results,
                                                        "keeps": kept}, indent=1))
    if args.out or args.plot:
        plot(results, args.plot or args.out + ".png", f"retrieval from a {n_prompt}-token prompt, {args.eval} prompts")


if __name__ == "__main__":
    main()
