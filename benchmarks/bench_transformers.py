"""Hugging Face transformers models on "fusedattn", "sdpa" and "eager" attention, in one run
(CPU), the same weights for all: prefill (fp32, bf16; with and without left padding), a
training step (forward + backward, left padding), greedy generation tokens/s, decode
step tokens/s at a 1024-position cache with transformers' cache and with fusedattn's
FusedCache (model dtype, bf16, int8), for a
Llama-shaped and a Gemma-2-shaped decoder (softcap and sliding windows, which "sdpa" refuses:
compared with "eager") and a BERT-shaped encoder with right padding.

Attention's own share: each case also runs with a no-op attention (returns its query), the
floor of everything else; "attention alone" is (time - floor). Medians of interleaved rounds
(the machine's load drifts; single runs of one pair moved 0.7x-1.9x here).

Writes benchmarks/results/transformers.json and .png.

  python benchmarks/bench_transformers.py [--quick] [--rounds N]
"""
import argparse
import copy
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_model  # noqa: E402

import fusedattn  # noqa: E402
import fusedattn.transformers as fa_hf  # noqa: E402
import transformers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def noop_attention(module, query, key, value, attention_mask, **kwargs):
    return query.transpose(1, 2), None


def register_all():
    fa_hf.register("fusedattn")
    transformers.AttentionInterface.register("noop", noop_attention)
    transformers.masking_utils.AttentionMaskInterface.register("noop", fa_hf.attention_mask)


def llama(quick):
    d, layers = (256, 2) if quick else (768, 8)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=d, intermediate_size=int(2.75 * d),
                                   num_hidden_layers=layers, num_attention_heads=d // 64,
                                   num_key_value_heads=max(d // 256, 1), max_position_embeddings=4096,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM, cfg


def gemma2(quick):
    d, layers = (256, 2) if quick else (768, 8)
    cfg = transformers.Gemma2Config(vocab_size=8192, hidden_size=d, intermediate_size=int(2.75 * d),
                                    num_hidden_layers=layers, num_attention_heads=d // 64,
                                    num_key_value_heads=max(d // 256, 1), head_dim=64,
                                    sliding_window=256, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, query_pre_attn_scalar=64,
                                    max_position_embeddings=4096, pad_token_id=0)
    return transformers.Gemma2ForCausalLM, cfg


def bert(quick):
    d, layers = (256, 2) if quick else (768, 8)
    cfg = transformers.BertConfig(vocab_size=8192, hidden_size=d, num_hidden_layers=layers,
                                  num_attention_heads=d // 64, intermediate_size=4 * d,
                                  max_position_embeddings=1024)
    return transformers.BertModel, cfg


def models(kind, quick, dtype, impls):
    cls, cfg = kind(quick)
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    base = cls(cfg).to(dtype).eval()
    out = {}
    for impl in impls:
        m = copy.deepcopy(base)
        m.set_attn_implementation(impl)
        out[impl] = m
    return out


def batch(b, length, padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 8192, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    if padding == "left":
        for i in range(b):
            mask[i, : (i * length) // (2 * b)] = 0
    elif padding == "right":
        for i in range(b):
            mask[i, length - (i * length) // (2 * b):] = 0
    ids[mask == 0] = 0
    return ids, mask


def interleaved(fns, rounds):
    """Median seconds of each fn over `rounds` interleaved rounds (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def case_prefill(kind, dtype, padding, b, length, rounds, quick, baseline):
    impls = ["fusedattn", baseline, "noop"]
    ms = models(kind, quick, dtype, impls)
    ids, mask = batch(b, length, padding)
    kwargs = dict(input_ids=ids) if padding == "none" else dict(input_ids=ids, attention_mask=mask)

    def run(m):
        def f():
            with torch.no_grad():
                m(**kwargs)
        return f
    return interleaved({k: run(m) for k, m in ms.items()}, rounds)


def case_train(kind, dtype, b, length, rounds, quick, baseline):
    impls = ["fusedattn", baseline, "noop"]
    ms = models(kind, quick, dtype, impls)
    ids, mask = batch(b, length, "left")

    def run(m):
        m.train()

        def f():
            m.zero_grad(set_to_none=True)
            out = m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
            out.loss.backward()
        return f
    return interleaved({k: run(m) for k, m in ms.items()}, rounds)


def case_generate(kind, dtype, b, prompt, new, rounds, quick, baseline):
    impls = ["fusedattn", baseline]
    ms = models(kind, quick, dtype, impls)
    ids, mask = batch(b, prompt, "left")
    outs = {}

    def run(k, m):
        def f():
            with torch.no_grad():
                outs[k] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=0)
        return f
    t = interleaved({k: run(k, m) for k, m in ms.items()}, rounds)
    same = torch.equal(outs["fusedattn"], outs[baseline])
    return {k: b * new / v for k, v in t.items()}, same


STORAGES = {"fusedattn+FusedCache": None, "fusedattn+FusedCache(bf16)": torch.bfloat16,
            "fusedattn+FusedCache(int8)": torch.int8}


def case_decode_cache(kind, dtype, b, prompt, new, rounds, quick):
    """One decode step at a cache of `prompt` positions (the step's token cropped off again
    after each timed step, so every step sees the same length), interleaved, with
    transformers' DynamicCache under "sdpa" and "fusedattn" and FusedCache per storage under
    "fusedattn"; -> tokens/s (batch / median step), greedy generation of `new` tokens
    compared with sdpa's, cache KiB per token."""
    ms = models(kind, quick, dtype, ["sdpa", "fusedattn"])
    ids, mask = batch(b, prompt, "left")
    runs = {"sdpa": (ms["sdpa"], None), "fusedattn": (ms["fusedattn"], None)}
    runs.update({k: (ms["fusedattn"], s) for k, s in STORAGES.items()})

    def make_cache(k, m, storage):
        if k in STORAGES:
            return fa_hf.FusedCache(m.config, cache_dtype=storage)
        return transformers.DynamicCache(config=m.config)

    step_ids = ids[:, -1:]
    step_mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], 1)
    fns, same, per_token = {}, {}, {}
    with torch.no_grad():
        ref = None
        for k, (m, storage) in runs.items():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0,
                             cache=make_cache(k, m, storage))
            ref = out if ref is None else ref
            same[k] = round((out[:, prompt:] == ref[:, prompt:]).float().mean().item(), 4)
            cache = make_cache(k, m, storage)
            m(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            if k in STORAGES:
                kv = [layer.kv for layer in cache.layers if hasattr(layer, "kv")]
                per_token[k] = round(sum(t.element_size() * t[0, :, 0].numel() for c in kv
                                         for t in (getattr(c, n) for n in c._row_tensors()))
                                     / 1024, 2)

            def step(m=m, cache=cache):
                with torch.no_grad():
                    m(input_ids=step_ids, attention_mask=step_mask, cache=cache, use_cache=True)
                    cache.crop(-1)
            fns[k] = step
    t = interleaved(fns, rounds)
    return {k: b / v for k, v in t.items()}, same, per_token


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models and sequences")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "transformers.json"))
    ap.add_argument("--only", default=None,
                    help="comma-separated cases (prefill, train, generate, decode) to rerun; "
                         "the other rows of --out are kept")
    args = ap.parse_args()
    register_all()
    q = args.quick
    b, length = (2, 256) if q else (4, 1024)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for padding in ("left", "none"):
            cases.append(("prefill", "llama", llama, dtype, padding, "sdpa"))
    cases += [("train", "llama", llama, torch.float32, "left", "sdpa"),
              ("prefill", "gemma2", gemma2, torch.float32, "left", "eager"),
              ("prefill", "bert", bert, torch.float32, "right", "sdpa"),
              ("generate", "llama", llama, torch.float32, "left", "sdpa"),
              ("generate", "llama", llama, torch.bfloat16, "left", "sdpa"),
              ("decode", "llama", llama, torch.float32, "left", "sdpa")]
    kept = []
    if args.only:
        only = set(args.only.split(","))
        cases = [c for c in cases if c[0] in only]
        if os.path.exists(args.out):
            with open(args.out) as f:
                kept = [r for r in json.load(f)["rows"] if r["case"] not in only]
    rows = []
    for what, name, kind, dtype, padding, baseline in tqdm(cases, desc="cases"):
        dt = str(dtype).replace("torch.", "")
        row = dict(case=what, model=name, dtype=dt, padding=padding, baseline=baseline)
        if what == "prefill":
            t = case_prefill(kind, dtype, padding, b, length, args.rounds, q, baseline)
        elif what == "train":
            t = case_train(kind, dtype, b, length // 2, args.rounds, q, baseline)
        elif what == "decode":
            tps, same, kib = case_decode_cache(kind, dtype, 2 if q else 8, 128 if q else 1024,
                                               8 if q else 32, 4 * args.rounds, q)
            row.update(decode_tokens_per_s={k: round(v, 1) for k, v in tps.items()},
                       speedup={k: round(v / tps["sdpa"], 3) for k, v in tps.items()},
                       same_tokens_as_sdpa=same, cache_kib_per_token=kib,
                       batch=2 if q else 8, prompt=128 if q else 1024)
            rows.append(row)
            for k, v in tps.items():
                tqdm.write(f"{what:8} {name:6} {dt:8} {k:27} decode tokens/s {v:7.1f} "
                           f"({v / tps['sdpa']:.2f}x sdpa, tokens as sdpa's {same[k]:.3f}"
                           + (f", {kib[k]} KiB/token)" if k in kib else ")"))
            continue
        else:
            tps, same = case_generate(kind, dtype, b, 64 if q else 128, 16 if q else 32,
                                      max(args.rounds // 2, 2), q, baseline)
            row.update(tokens_per_s={k: round(v, 1) for k, v in tps.items()},
                       speedup=round(tps["fusedattn"] / tps[baseline], 3), same_tokens=same)
            rows.append(row)
            tqdm.write(f"{what:8} {name:6} {dt:8} {padding:5} tokens/s fusedattn "
                       f"{tps['fusedattn']:.1f} {baseline} {tps[baseline]:.1f} "
                       f"({row['speedup']:.2f}x, same tokens: {same})")
            continue
        floor = t["noop"]
        ours, theirs = t["fusedattn"], t[baseline]
        row.update(ms={k: round(v * 1e3, 1) for k, v in t.items()},
                   speedup=round(theirs / ours, 3),
                   attention_ms={"fusedattn": round((ours - floor) * 1e3, 1),
                                 baseline: round((theirs - floor) * 1e3, 1)},
                   attention_speedup=round((theirs - floor) / max(ours - floor, 1e-9), 3))
        rows.append(row)
        tqdm.write(f"{what:8} {name:6} {dt:8} {padding:5} fusedattn {ours * 1e3:8.1f} ms  "
                   f"{baseline} {theirs * 1e3:8.1f} ms  ({row['speedup']:.2f}x)  attention "
                   f"alone {row['attention_ms']['fusedattn']:.1f} vs "
                   f"{row['attention_ms'][baseline]:.1f} ms ({row['attention_speedup']:.2f}x)")
    meta = dict(cpu=cpu_model(), capability=fusedattn.cpu_capability(), torch=torch.__version__,
                transformers=transformers.__version__, threads=torch.get_num_threads(),
                batch=b, length=length, rounds=args.rounds, quick=q,
                date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = kept + rows
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, meta, args.out[:-5] + ".png")
    print(f"wrote {args.out}")


def plot(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['case']} {r['model']}\n{r['dtype']} {r['padding']} vs {r['baseline']}"
              + ("\n(int8 FusedCache)" if r["case"] == "decode" else "") for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    x = range(len(rows))
    def end_to_end(r):  # a decode row: the int8 FusedCache's speed-up
        return r["speedup"]["fusedattn+FusedCache(int8)"] if r["case"] == "decode" else r["speedup"]
    ax.bar([i - 0.2 for i in x], [end_to_end(r) for r in rows], 0.4, label="end to end")
    ax.bar([i + 0.2 for i in x], [r.get("attention_speedup", 0) for r in rows], 0.4,
           label="attention alone")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("speed-up of fusedattn (x)")
    ax.set_title(f"transformers models, {meta['cpu']} ({meta['threads']} threads)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
