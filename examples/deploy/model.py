"""A small encoder-decoder made of fusedattn modules, the model the deployment example ships."""
import torch
import torch.nn as nn

import fusedattn


class TinyTranslator(nn.Module):
    """Embeddings, one encoder self-attention (key padding), one decoder causal self-attention
    and one cross-attention that also returns its weights, then logits.

    forward(src (B, S) int64, src_pad (B, S) bool True = padding, tgt (B, T) int64)
    -> (logits (B, T, vocab), cross-attention weights (B, T, S))"""

    def __init__(self, vocab=40, d_model=32, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.enc_attn = fusedattn.MultiheadAttention(d_model, heads, batch_first=True)
        self.dec_attn = fusedattn.MultiheadAttention(d_model, heads, batch_first=True)
        self.cross_attn = fusedattn.MultiheadAttention(d_model, heads, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab)

    def forward(self, src, src_pad, tgt):
        s = self.embed(src)
        s = self.norm(s + self.enc_attn(s, s, s, key_padding_mask=src_pad, need_weights=False)[0])
        t = self.embed(tgt)
        t = self.norm(t + self.dec_attn(t, t, t, is_causal=True, need_weights=False)[0])
        c, weights = self.cross_attn(t, s, s, key_padding_mask=src_pad)
        return self.out(self.norm(t + c)), weights


def example_inputs(batch, src_len, tgt_len, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(vocab, (batch, src_len), generator=g)
    lengths = torch.randint(1, src_len + 1, (batch,), generator=g)
    lengths[0] = src_len
    src_pad = torch.arange(src_len).unsqueeze(0) >= lengths.unsqueeze(1)
    tgt = torch.randint(vocab, (batch, tgt_len), generator=g)
    return src, src_pad, tgt
