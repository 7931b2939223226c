"""A decoder-only character language model made of fusedattn.MultiheadAttention: trained with
the causal forward on a corpus this example writes itself (sentences from a small grammar),
then sampled token by token through fusedattn.KVCache, with tokens/s beside recomputing the
whole prefix for every new token (the same model and weights).

    python examples/char_lm.py [--steps 300] [--tokens 96]

Positions are learned up to the training context (128 characters), so the prompt (32) and the
generated tokens stay within it.
"""
import argparse
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedattn
from common import fit

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird",
            "the robot", "our neighbour"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "remembers", "calls", "helps"]
OBJECTS = ["the red ball", "a quiet river", "the tall tree", "an open door", "the morning train",
           "a blue kite", "the long road", "a warm cup of tea"]
PLACES = ["in the park", "at the station", "by the sea", "under the bridge", "near the school",
          "in the garden"]


def make_corpus(sentences=3000, seed=0):
    """Sentences 'subject verb object [place].' joined by spaces; deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(PLACES)}"
        out.append(s + ".")
    return " ".join(out)


class CharLM(nn.Module):
    """Pre-norm decoder-only Transformer over characters."""

    def __init__(self, vocab, d=128, heads=4, layers=3, max_len=1024):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.attn = nn.ModuleList(fusedattn.MultiheadAttention(d, heads, batch_first=True)
                                  for _ in range(layers))
        self.ff = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                for _ in range(layers))
        self.norms = nn.ModuleList(nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
                                   for _ in range(layers))
        self.out_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens, caches=None, start=0):
        """tokens (N, T) at positions start.. -> logits (N, T, vocab). With caches (one
        KVCache per layer) the new tokens attend to the cached ones and are appended."""
        x = self.tok(tokens) + self.pos(torch.arange(start, start + tokens.shape[1]))
        for i, (attn, ff, (n1, n2)) in enumerate(zip(self.attn, self.ff, self.norms)):
            h = n1(x)
            cache = None if caches is None else caches[i]
            x = x + attn(h, h, h, is_causal=True, need_weights=False, cache=cache)[0]
            x = x + ff(n2(x))
        return self.head(self.out_norm(x))

    def caches(self, batch, max_len, cache_dtype=None):
        return [a.kv_cache(batch, max_len, cache_dtype=cache_dtype) for a in self.attn]


@torch.no_grad()
def generate(model, prompt, new_tokens, temperature=0.8, seed=0, cached=True, cache_dtype=None):
    """Sampling from prompt (N, P) (temperature 0: greedy): through per-layer KV caches
    stored in cache_dtype, or (cached=False) by running the whole sequence again for every
    token. -> (N, P + new_tokens) tokens."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = prompt
    caches = (model.caches(prompt.shape[0], prompt.shape[1] + new_tokens, cache_dtype)
              if cached else None)
    logits = model(prompt, caches)[:, -1]
    for i in range(new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen)
        tokens = torch.cat([tokens, nxt], 1)
        if i + 1 == new_tokens:
            break
        if cached:
            logits = model(nxt, caches, start=tokens.shape[1] - 1)[:, -1]
        else:
            logits = model(tokens)[:, -1]
    return tokens


@torch.no_grad()
def forced_agreement(model, prompt, continuation, cache_dtype):
    """The fraction of positions at which decoding through caches stored in cache_dtype picks
    the same greedy token as `continuation` (the full cache's), each position given the same
    prefix (the continuation's tokens fed back, so that one different pick does not change
    every later one)."""
    model.eval()
    caches = model.caches(prompt.shape[0], prompt.shape[1] + continuation.shape[1], cache_dtype)
    logits = model(prompt, caches)[:, -1]
    same = []
    for i in range(continuation.shape[1]):
        same.append(logits.argmax(-1) == continuation[:, i])
        logits = model(continuation[:, i:i + 1], caches, start=prompt.shape[1] + i)[:, -1]
    return torch.stack(same, 1).float().mean().item()


def run(steps=300, tokens=96, batch=32, context=128, quiet=False):
    torch.manual_seed(0)
    text = make_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    if 32 + tokens > context:
        raise ValueError(f"char_lm: 32 prompt + {tokens} new tokens exceed the context {context}")
    model = CharLM(len(chars), max_len=context)
    gen = torch.Generator().manual_seed(1)

    losses = []

    def batch_loss():
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        losses.append(loss.item())
        return loss

    model.train()
    fit(model, steps, batch_loss, lr=3e-3, quiet=quiet)
    loss = sum(losses[-10:]) / len(losses[-10:])
    prompt = data[:32].unsqueeze(0)
    results = {}
    for cached in (True, False):
        t0 = time.perf_counter()
        out = generate(model, prompt, tokens, cached=cached)
        results[cached] = (out, tokens / (time.perf_counter() - t0))
    # Greedy continuations of 16 prompts with the full cache and with an int8 one.
    prompts = torch.stack([data[s:s + 32] for s in range(0, 16 * 97, 97)])
    full = generate(model, prompts, tokens, temperature=0)[:, 32:]
    int8 = generate(model, prompts, tokens, temperature=0, cache_dtype=torch.int8)[:, 32:]
    forced = forced_agreement(model, prompts, full, torch.int8)
    sample = "".join(chars[i] for i in results[True][0][0].tolist())
    words = sample[32:].replace(".", " ").split()
    known = set(" ".join(SUBJECTS + VERBS + OBJECTS + PLACES).split())
    return {"loss": loss, "sample": sample, "tokens_per_s": results[True][1],
            "tokens_per_s_recompute": results[False][1],
            "same_tokens": bool(torch.equal(results[True][0], results[False][0])),
            "int8_cache_same_greedy_tokens": (full == int8).float().mean().item(),
            "int8_cache_same_next_token": forced,
            "known_word_fraction": sum(w in known for w in words) / max(len(words), 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args(argv)
    r = run(args.steps, args.tokens)
    print(f"training loss (last 10 steps) {r['loss']:.3f}")
    print(f"sample: {r['sample']!r}")
    print(f"{r['known_word_fraction']:.0%} of the generated words are words of the corpus")
    print(f"generation through fusedattn.KVCache: {r['tokens_per_s']:.0f} tokens/s; recomputing "
          f"the prefix: {r['tokens_per_s_recompute']:.0f} tokens/s "
          f"({r['tokens_per_s'] / r['tokens_per_s_recompute']:.1f}x); same tokens: {r['same_tokens']}")
    print(f"greedy decoding of 16 prompts with an int8 cache: the same next token as the full "
          f"cache's at {r['int8_cache_same_next_token']:.1%} of positions (same prefix); "
          f"free-running, {r['int8_cache_same_greedy_tokens']:.1%} of the tokens equal (a "
          f"different pick changes the rest of its sequence)")
    return r


if __name__ == "__main__":
    main()
