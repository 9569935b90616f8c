"""Issue 20's quality benchmark: which KV-cache compression keeps what a small decoder needs to answer?

    python benchmarks/kv_quality.py [--steps 2000] [--eval 400] [--context 128] [--window 16] [--out FILE]

The task (synthetic long-context retrieval, the question at the end): a context of ``--context`` tokens holds
``--pairs`` records ``k va vb`` (a key token and a two-token value) at random places in random filler; after it,
``? k`` asks for one record, and the answer is its value ``va vb``::

    f f k7 v3 v9 f f f ... f k2 v14 v1 f f ... f  ? k2   →   v14 v1

Every model sees the prompt (context + question) once — the prefill, scored and compressed by `attnlens.kv` — and
generates the two answer tokens greedily: ``va`` from the prefill's own logits (the full context), ``vb`` from the
compressed cache. An answer counts when both tokens are right.

The model: a random Llama (2 layers, hidden 128, 4 query / 2 key-value heads, D = 32), trained here for ``--steps``
steps on the CPU — every other step on this task (teacher forcing, several questions per context, loss on the
answers), the others on copying random chunks (induction by content, which the task needs) — once: the
weights are cached under ``~/.cache/attnlens/kv-quality`` (never in git), keyed by the settings.

Reported: accuracy at ratios 0, 0.25, 0.5, 0.75, 0.9 for every method of `attnlens.kv.METHODS` on ``--eval`` fresh
prompts (the same for every method), a Markdown table, a JSON file and a matplotlib plot (FILE.md, .json, .png).
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
CACHE = Path(os.path.expanduser("~/.cache/attnlens/kv-quality"))


@dataclass(frozen=True)
class Task:
    context: int = 128
    pairs: int = 8
    keys: int = 16
    values: int = 32
    filler: int = 32
    questions: int = 8  # per training sequence

    @property
    def vocab(self) -> int:
        return 3 + self.keys + self.values + self.filler

    # token ids: 0 pad, 1 bos, 2 "?", then keys, values, filler
    def key(self, i):
        return 3 + i

    def value(self, i):
        return 3 + self.keys + i

    def fill(self, i):
        return 3 + self.keys + self.values + i


def make_batch(task: Task, rng: np.random.Generator, n: int, questions: int):
    """``(ids (n, T), targets (n, T) with -100 off the answers, answers (n, questions, 2))``: each row a context with
    ``task.pairs`` records, then ``questions`` questions ``? k va vb`` (answers at the va, vb places)."""
    T = 1 + task.context + 4 * questions
    ids = np.zeros((n, T), dtype=np.int64)
    tgt = np.full((n, T), -100, dtype=np.int64)
    ans = np.zeros((n, questions, 2), dtype=np.int64)
    for r in range(n):
        ctx = task.fill(rng.integers(0, task.filler, task.context))
        keys = rng.choice(task.keys, task.pairs, replace=False)
        vals = rng.choice(task.values, 2 * task.pairs, replace=False).reshape(task.pairs, 2)
        slots = np.sort(rng.choice(task.context // 3, task.pairs, replace=False)) * 3  # non-overlapping places
        for (k, (a, b)), s in zip(zip(keys, vals), slots):
            ctx[s: s + 3] = [task.key(k), task.value(a), task.value(b)]
        row = [1] + ctx.tolist()
        for qi, p in enumerate(rng.choice(task.pairs, questions, replace=questions > task.pairs)):
            a, b = task.value(vals[p, 0]), task.value(vals[p, 1])
            row += [2, task.key(keys[p]), a, b]
            ans[r, qi] = (a, b)
        ids[r] = row
        for qi in range(questions):  # predict va at the key, vb at va
            at = 1 + task.context + 4 * qi
            tgt[r, at + 1], tgt[r, at + 2] = ids[r, at + 2], ids[r, at + 3]
    return torch.tensor(ids), torch.tensor(tgt), ans


def copy_batch(task: Task, rng: np.random.Generator, n: int, length: int):
    """``(ids, targets)``: random tokens, then chunks of 4 to 8 of them copied from random earlier places, the loss on
    each chunk's tokens after its first — induction by content (the copy's offset varies, so no fixed relative
    position solves it), what the retrieval task needs."""
    half = length // 2
    ids = np.zeros((n, 1 + length), dtype=np.int64)
    tgt = np.full((n, 1 + length), -100, dtype=np.int64)
    ids[:, 0] = 1
    for r in range(n):
        x = rng.integers(3, task.vocab, half)
        row, lab = [1] + x.tolist(), [-100] * (1 + half)
        while len(row) < 1 + length:
            c = int(rng.integers(4, 9))
            a = int(rng.integers(0, half - c))
            row += x[a: a + c].tolist()
            lab += [-100] + x[a + 1: a + c].tolist()
        ids[r], tgt[r] = row[: 1 + length], lab[: 1 + length]
    return torch.tensor(ids), torch.tensor(tgt)


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
    for step in range(steps):  # half the steps copy random chunks (induction), half answer retrieval questions
        if step % 2:
            ids, tgt, _ = make_batch(task, rng, batch, task.questions)
        else:
            ids, tgt = copy_batch(task, rng, batch, task.context + 4 * task.questions)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 1 or step == steps - 1:  # odd steps: the retrieval task
            with torch.no_grad():
                pred = logits[:, :-1].argmax(-1)
                m = tgt[:, 1:] != -100
                acc = float((pred[m] == tgt[:, 1:][m]).float().mean())
            log.append({"step": step, "loss": float(loss.detach()), "token_acc": acc, "seconds": time.perf_counter() - t0})
            print(json.dumps(log[-1]), flush=True)
    return model.eval(), log


def load_or_train(task: Task, steps: int, batch: int, lr: float, seed: int):
    key = hashlib.sha256(json.dumps([asdict(task), steps, batch, lr, seed]).encode()).hexdigest()[:16]
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


def evaluate(model, task: Task, n: int, method: str, ratio: float, window: int, batch: int = 100, seed: int = 1234):
    """Accuracy on ``n`` prompts (context + ``? k``): both answer tokens right, greedy, on the compressed cache."""
    rng = np.random.default_rng(seed)
    right = 0
    kept = []
    for a in range(0, n, batch):
        ids, _, ans = make_batch(task, rng, min(batch, n - a), 1)
        prompt = ids[:, : 1 + task.context + 2]  # up to "? k"
        with torch.no_grad(), kv.compress(model, method=method, ratio=ratio, window=window) as press:
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2,
                                 do_sample=False, pad_token_id=0)
        got = out[:, prompt.shape[1]:].numpy()
        right += int((got == ans[:, 0]).all(1).sum())
        kept.append(float(np.mean([ls.budget.float().mean() for ls in press.layers])))
    return right / n, float(np.mean(kept))


def plot(results, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for method in kv.METHODS:
        xs = [r["ratio"] for r in results if r["method"] == method]
        ys = [r["accuracy"] for r in results if r["method"] == method]
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("compression ratio (fraction of the KV cache evicted)")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(RATIOS)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--window", type=int, default=16, help="SnapKV / PyramidKV observation window")
    ap.add_argument("--out", default=None, help="write FILE.md, FILE.json and FILE.png")
    args = ap.parse_args(argv)
    task = Task(context=args.context, pairs=args.pairs)
    t0 = time.perf_counter()
    model, log, path = load_or_train(task, args.steps, args.batch, args.lr, args.seed)
    trained = time.perf_counter() - t0
    print(f"model: {path} ({trained:.0f} s)", flush=True)
    results = []
    for method in kv.METHODS:
        for ratio in RATIOS:
            acc, kept = evaluate(model, task, args.eval, method, ratio, args.window)
            results.append({"method": method, "ratio": ratio, "accuracy": acc, "kept_per_layer": kept})
            print(json.dumps(results[-1]), flush=True)
    day = datetime.date.today().isoformat()
    n_prompt = 1 + task.context + 2
    md = [f"# KV-cache compression on a retrieval task (issue 20's quality benchmark), {day}", "",
          f"Command: `python benchmarks/kv_quality.py --context {args.context} --pairs {args.pairs} --steps {args.steps} "
          f"--batch {args.batch} --lr {args.lr} --seed {args.seed} --eval {args.eval} --window {args.window}"
          + (f" --out {args.out}`" if args.out else "`"), "",
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
          f"Model: Llama, 2 layers, hidden 128, 4 query / 2 KV heads (D = 32), trained {args.steps} steps "
          f"(batch {args.batch}) in {log[-1]['seconds']:.0f} s; final training answer-token accuracy "
          f"{log[-1]['token_acc']:.3f}. Prompts: {n_prompt} tokens ({args.pairs} records `k va vb` in "
          f"{args.context} tokens of filler, then `? k`); {args.eval} prompts per cell, the same for every method; "
          f"SnapKV/PyramidKV window {args.window}, kernel 5; StreamingLLM 4 sinks.", "",
          "| method | " + " | ".join(f"ratio {r}" for r in RATIOS) + " |", "|---|" + "---|" * len(RATIOS)]
    for method in kv.METHODS:
        accs = [r["accuracy"] for r in results if r["method"] == method]
        md.append(f"| {method} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "train_log": log, "results": results},
                                                       indent=1))
        plot(results, args.out + ".png", f"retrieval from a {n_prompt}-token prompt, {args.eval} prompts")


if __name__ == "__main__":
    main()
