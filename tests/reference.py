"""Step-by-step pieces of an open_clip ViT written from the methods' definitions, for the reference
computations of the method tests: explicit layer norms and per-head loops on
`in_proj_weight` slices of a float64 copy of the model, never the backend's adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import random_image

from clipviz.backend import Texts, ensemble_templates


def _batch(backend, n=2):
    return torch.stack([backend.preprocess(random_image(seed=i)) for i in range(n)])


def _texts(backend, prompts, ensemble=False):
    """Unit text embeddings computed here from the text tower, not through the backend."""
    templates = ensemble_templates() if ensemble else ["{}"]
    rows = []
    with torch.no_grad():
        for p in prompts:
            emb = backend.model.encode_text(backend.tokenizer([t.format(p) for t in templates]))
            rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    return Texts(list(prompts), torch.stack(rows), ensemble)


def _layer_norm(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _heads_attention(query, key, value, heads):
    """Per-head `softmax(query key^T / sqrt(d)) value`, one head at a time; `[B, L, W]`."""
    d = query.shape[-1] // heads
    out = []
    for i in range(heads):
        s = slice(i * d, (i + 1) * d)
        probs = torch.softmax(query[..., s] @ key[..., s].transpose(-1, -2) * d**-0.5, dim=-1)
        out.append(probs @ value[..., s])
    return torch.cat(out, dim=-1)


def _qkv(block, x):
    """q, k, v `[B, L, W]` of `block` on the residual stream `x`, from `in_proj` slices."""
    W = x.shape[-1]
    h = _layer_norm(block.ln_1, x)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    return [h @ w[i * W : (i + 1) * W].T + b[i * W : (i + 1) * W] for i in range(3)]


def _out_proj(block, x):
    return x @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def _vit_input(visual, images):
    """Embeddings after `ln_pre` (`[B, 1+N, W]`) at the model's native grid."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    return _layer_norm(visual.ln_pre, torch.cat([cls, x], 1) + visual.positional_embedding)


def _vit_head(visual, x):
    return F.normalize(_layer_norm(visual.ln_post, x) @ visual.proj, dim=-1)


def _maps(sim, grid):
    return sim.transpose(1, 2).reshape(sim.shape[0], sim.shape[2], *grid).float()


def _stock_image(backend, x):
    with torch.no_grad():
        return F.normalize(backend.model.encode_image(x), dim=-1)
