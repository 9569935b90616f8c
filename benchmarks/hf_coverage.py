"""Which Hugging Face architectures attnlens serves through ``attn_implementation="attnlens"``, checked.

    python benchmarks/hf_coverage.py [--only gemma2,gpt_oss] [--out benchmarks/results/hf-coverage-DATE.md]

Every architecture of transformers' causal-LM table (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) is built small
from its config class (no download: 2 layers, width 32, 4 heads, 2 kv heads where it has them, tiny experts).
An architecture *routes attention through AttentionInterface* when ``set_attn_implementation("attnlens")``
takes and a capture records its attention calls; for each that does, builds, and runs with its own default
implementation, three checks, all in float32 on the CPU:

1. logits: a left-padded batch of 2 × 10 tokens, attnlens (its fused path, and under a capture: the lens
   path) against the model's default implementation (max |difference| over the real positions
   <= 1e-4 · max(1, max |logit|));
2. weights: ``hf.capture(lens=Lens(rows="all"))`` against eager ``output_attentions=True``, layer by
   layer, over the real query rows (<= 1e-5); skipped ("n/a") where eager returns no weights;
3. generation: greedy ``generate`` of 5 tokens with a KV cache from the padded batch, identical tokens.

Prints one line per architecture and the count; ``--out`` also writes the table as Markdown.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens import hf  # noqa: E402

#: small values for the size fields a config has (only those it has are passed)
SMALL = dict(
    vocab_size=99, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
    d_model=32, n_layers=2, n_heads=4, d_ff=37, ffn_dim=37, decoder_layers=2, decoder_attention_heads=4,
    decoder_ffn_dim=37, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=37, num_layers=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_local_experts=4,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_topk=2, topk_group=1, n_group=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
    sliding_window=6, rotary_dim=4, partial_rotary_factor=0.5, attention_dropout=0.0, hidden_dropout=0.0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, pad_token_id=0, use_cache=True,
)
TIMEOUT_S = 30


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def small_config(model_type: str, mha: bool = False):
    """The small config; ``mha``: as many kv heads as query heads (architectures whose attention needs it)."""
    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    kw = {k: v for k, v in SMALL.items() if k in defaults}
    if mha and "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    if "n_embd" in defaults and "hidden_size" in kw and defaults.get("n_embd") is not None:
        kw.pop("hidden_size", None)
    cfg = cls(**kw)
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True  # encoders with a causal-LM head (BERT, RoBERTa, ...)
    return cfg


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (2, 10), generator=g)
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, :3] = 0  # left padding
    return ids, am


def _set(model, impl) -> bool:
    try:
        model.set_attn_implementation(impl)
    except Exception:  # noqa: BLE001 - any refusal means "does not route through AttentionInterface"
        return False
    return model.config._attn_implementation == impl


def check(model_type: str) -> tuple[str, str]:
    """``(status, detail)``: PASS, FAIL, "no AttentionInterface", "no attention layer", "default fails" (the model's
    own implementation fails on the small config), or "not built small"."""
    ids, am = _inputs()
    for mha in (False, True):  # GQA first; MHA where the small GQA config does not run
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(small_config(model_type, mha)).eval()
        except Exception as e:  # noqa: BLE001
            return "not built small", f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
        default = model.config._attn_implementation
        if not _set(model, hf.IMPLEMENTATION):
            return "no AttentionInterface", f"default {default!r}"
        _set(model, default)
        try:
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=am).logits
            break
        except Exception as e:  # noqa: BLE001 - the model's own implementation fails on this machine / config
            failed = f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
    else:
        return "default fails", failed
    real = am.bool()
    notes = []
    with torch.no_grad():
        with hf.capture(model) as probe:
            model(input_ids=ids[:, :2])
        if not probe.results:
            return "no attention layer", f"default {default!r}"
        _set(model, hf.IMPLEMENTATION)
        got = model(input_ids=ids, attention_mask=am).logits
        err = (got - ref)[real].abs().max().item()
        tol = 1e-4 * max(1.0, ref[real].abs().max().item())
        if not err <= tol:
            return "FAIL", f"logits differ by {err:.2e} (tolerance {tol:.1e})"
        notes.append(f"logits {err:.1e}")
        weights = "n/a"
        if _set(model, "eager"):
            eager = model(input_ids=ids, attention_mask=am, output_attentions=True)
            atts = [a for a in (getattr(eager, "attentions", None) or ()) if a is not None]
            _set(model, default)
            with hf.capture(model, lens=al.Lens(rows="all")) as cap:
                cap_logits = model(input_ids=ids, attention_mask=am).logits
            cerr = (cap_logits - ref)[real].abs().max().item()
            if not cerr <= tol:
                return "FAIL", f"logits under capture differ by {cerr:.2e} (tolerance {tol:.1e})"
            notes.append(f"under capture {cerr:.1e}")
            caps = [r.result.weights for r in cap.results]
            if atts and len(atts) == len(caps) and all(a.shape == c.shape for a, c in zip(atts, caps)):
                werr = max((c - a).transpose(1, 2)[real].abs().max().item() for a, c in zip(atts, caps))
                if not werr <= 1e-5:
                    return "FAIL", f"captured weights differ from eager by {werr:.2e}"
                weights = f"{werr:.1e}"
                if any(r.result.sink_weight is not None for r in cap.results):
                    weights += " (+sink weight)"
        notes.append(f"weights {weights}")
    _set(model, default)
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref_gen = model.generate(ids, **kw)
    _set(model, hf.IMPLEMENTATION)
    got_gen = model.generate(ids, **kw)
    if not torch.equal(ref_gen, got_gen):
        return "FAIL", "greedy generation differs"
    notes.append("generation equal")
    return "PASS", ", ".join(notes) + f" (default {default!r})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated model types (default: every causal LM)")
    ap.add_argument("--out", default="", help="also write the table as Markdown to this file")
    args = ap.parse_args(argv)
    types = [t for t in args.only.split(",") if t] or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    t0 = time.time()
    for mt in types:
        signal.alarm(TIMEOUT_S)
        try:
            status, detail = check(mt)
        except _Timeout:
            status, detail = "FAIL", f"timed out after {TIMEOUT_S} s"
        except Exception as e:  # noqa: BLE001
            last = traceback.extract_tb(e.__traceback__)[-1]
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''} " \
                                     f"({os.path.basename(last.filename)}:{last.lineno})"
        finally:
            signal.alarm(0)
        rows.append((mt, status, detail))
        print(f"{mt:28s} {status:22s} {detail}", flush=True)
    served = [r for r in rows if r[1] in ("PASS", "FAIL")]
    passed = [r for r in served if r[1] == "PASS"]
    summary = (f"{len(passed)} of {len(served)} architectures that route attention through AttentionInterface "
               f"(and build small from their config) pass; {len(rows)} tried in {time.time() - t0:.0f} s")
    print("\n" + summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Hugging Face coverage of `attn_implementation=\"attnlens\"`\n\n"
                    f"`python benchmarks/hf_coverage.py --out {args.out}` — transformers {transformers.__version__}, "
                    f"torch {torch.__version__}, Python {platform.python_version()}, CPU, float32.\n\n"
                    f"**{summary}.**\n\n| architecture | result | detail |\n|---|---|---|\n")
            for mt, status, detail in rows:
                f.write(f"| {mt} | {status} | {detail.replace('|', '/')} |\n")
    return 0 if len(passed) == len(served) else 1


if __name__ == "__main__":
    sys.exit(main())
