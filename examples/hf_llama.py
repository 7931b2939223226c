"""A Hugging Face Llama-shaped model on fusedattn: built from a config (nothing downloaded),
trained with padding-free packing (transformers' DataCollatorWithFlattening: the batch is one
row of concatenated sequences whose position ids restart, which fusedattn runs as packed
variable-length attention, no padding and no block-diagonal mask), then generating, with
tokens/s against transformers' "sdpa" attention on the same weights.

The task: arithmetic progressions modulo the vocabulary (start, start + k, start + 2k, ...),
so a trained model continues a prompt exactly.

  python examples/hf_llama.py [--steps 300]
"""
import argparse
import copy
import time

import torch
import transformers
from tqdm import tqdm

import fusedattn.transformers

VOCAB = 64


def progression(g, length):
    start = int(torch.randint(0, VOCAB, (1,), generator=g))
    step = int(torch.randint(1, 5, (1,), generator=g))
    return [(start + i * step) % VOCAB for i in range(length)]


def packed_batch(collator, g, n=8):
    lengths = torch.randint(8, 33, (n,), generator=g).tolist()
    return collator([{"input_ids": progression(g, n)} for n in lengths])


def build_model(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM._from_config(
        cfg, attn_implementation=fusedattn.transformers.register())


def train(model, steps, seed=0, quiet=False):
    g = torch.Generator().manual_seed(seed)
    collator = transformers.DataCollatorWithFlattening(return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    bar = tqdm(range(steps), desc="training (packed)", disable=quiet)
    for _ in bar:
        batch = packed_batch(collator, g)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def continuation_accuracy(model, seed=1, n=16, prompt=6, new=20):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.tensor([progression(g, prompt + new) for _ in range(n)])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=seqs[:, :prompt], max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return (out[:, prompt:] == seqs[:, prompt:]).float().mean().item(), out


def tokens_per_second(model, batch=8, prompt=32, new=64, rounds=3):
    ids = torch.randint(0, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(2))
    model.eval()
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - t0)
    return batch * new / sorted(times[1:])[rounds // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    model = build_model()
    loss = train(model, args.steps)
    acc, out = continuation_accuracy(model)
    print(f"final training loss {loss:.3f}; greedy continuation of held-out progressions: "
          f"{100 * acc:.1f}% of tokens right")
    print("prompt + generated:", out[0].tolist())
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    ours, theirs = tokens_per_second(model), tokens_per_second(sdpa)
    print(f"generation: fusedattn {ours:.0f} tokens/s, sdpa {theirs:.0f} tokens/s "
          f"({ours / theirs:.2f}x)")


if __name__ == "__main__":
    main()
