"""SCLIP, NACLIP and GEM against step-by-step computations of their authors' code
(wangf3014/SCLIP `custom_attn`, sinahmr/NACLIP `custom_attn` + `gaussian_window`,
WalBouss/GEM `SelfSelfAttention` + `GEMResidualBlock`) on a float64 copy of the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from reference import (
    _batch,
    _heads_attention,
    _layer_norm,
    _maps,
    _out_proj,
    _qkv,
    _stock_image,
    _texts,
    _vit_head,
    _vit_input,
)

from clipviz import ClipvizError, explain
from clipviz.methods.selfattention import gem, naclip, neighbourhood_bias, sclip

PROMPTS = ["a dog", "a red square", "grass"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _per_head(fn, heads, *tensors):
    """`fn` applied to each head's slice of `[B, L, W]` tensors, concatenated back."""
    d = tensors[0].shape[-1] // heads
    return torch.cat(
        [fn(*(t[..., i * d : (i + 1) * d] for t in tensors)) for i in range(heads)], -1
    )


def _softmax_attention(a, b, scale):
    return torch.softmax(a @ b.transpose(-1, -2) * scale, dim=-1)


def _last_block_input(backend, x):
    m = copy.deepcopy(backend.model).double()
    v = m.visual
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        h = _vit_input(v, x.double())
        for block in blocks[:-1]:
            h = block(h)
    return v, blocks[-1], h


# -- SCLIP ---------------------------------------------------------------------------------


def test_sclip_sums_qq_and_kk_attention_and_keeps_residual_and_mlp(vit_backend):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    v, last, x_in = _last_block_input(b, x)
    heads = last.attn.num_heads
    with torch.no_grad():
        q, k, val = _qkv(last, x_in)
        scale = (q.shape[-1] // heads) ** -0.5

        def csa(qh, kh, vh):  # custom_attn(csa=True): a sum of two softmaxes, rows sum to 2
            return (_softmax_attention(qh, qh, scale) + _softmax_attention(kh, kh, scale)) @ vh

        y = x_in + _out_proj(last, _per_head(csa, heads, q, k, val))
        y = y + last.mlp(_layer_norm(last.ln_2, y))
        tokens = _vit_head(v, y)[:, 1:]
    expected = tokens @ texts.embeddings.double().T
    result = sclip(b, x, texts)
    torch.testing.assert_close(result.maps, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


# -- NACLIP --------------------------------------------------------------------------------


def _naclip_addition(h, w, std):
    """The reference's construction: a (2h-1)x(2w-1) Gaussian window convolved over one-hot
    position maps, then a zero row and column for the class token."""
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (2 * h - 1, 2 * w - 1):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + dim - 1) * constant, dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(h), torch.eye(w)).permute(0, 3, 1, 2).contiguous()
    out = F.conv2d(m.view(-1, h, w).unsqueeze(1), window[None, None], padding="same").squeeze(1)
    out = out.view(h * w, h * w)
    out = torch.vstack([torch.zeros((1, h * w)), out])
    return torch.hstack([torch.zeros((h * w + 1, 1)), out])


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_neighbourhood_bias_equals_the_references_convolved_window(grid):
    expected = _naclip_addition(*grid, std=5.0)
    torch.testing.assert_close(neighbourhood_bias(grid, 1, 5.0), expected, atol=1e-6, rtol=1e-6)
    # two prefix tokens (class + a register): zero rows and columns for both
    two = neighbourhood_bias(grid, 2, 5.0)
    assert two[:2].abs().max() == 0 and two[:, :2].abs().max() == 0
    torch.testing.assert_close(two[1:, 1:], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("std", [5.0, 0.7])
def test_naclip_is_kk_attention_with_gaussian_prior_without_residual_or_mlp(vit_backend, std):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    v, last, x_in = _last_block_input(b, x)
    heads = last.attn.num_heads
    omega = _naclip_addition(4, 4, std).double()
    with torch.no_grad():
        _, k, val = _qkv(last, x_in)
        scale = (k.shape[-1] // heads) ** -0.5

        def attention(kh, vh):
            return torch.softmax(kh @ kh.transpose(-1, -2) * scale + omega, dim=-1) @ vh

        y = _out_proj(last, _per_head(attention, heads, k, val))  # no residual, no MLP
        tokens = _vit_head(v, y)[:, 1:]
    expected = tokens @ texts.embeddings.double().T
    result = naclip(b, x, texts, std=std)
    torch.testing.assert_close(result.maps, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_naclip_prior_changes_the_map(vit_backend):
    b = vit_backend
    x, texts = _batch(b), _texts(b, PROMPTS)
    assert not torch.allclose(
        naclip(b, x, texts).maps, naclip(b, x, texts, std=0.3).maps, atol=1e-4
    )
    with pytest.raises(ClipvizError, match="std=0.0 must be positive"):
        naclip(b, x, texts, std=0.0)


# -- GEM -----------------------------------------------------------------------------------


def _gem_reference(backend, x, depth, iterations=1, temperature=None):
    """GEMResidualBlock over the last `depth` blocks of a float64 copy, as released."""
    m = copy.deepcopy(backend.model).double()
    v = m.visual
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        x_ori = _vit_input(v, x.double())
        for block in blocks[: len(blocks) - depth]:
            x_ori = block(x_ori)
        x_gem = x_ori
        for block in blocks[len(blocks) - depth :]:
            h = _layer_norm(block.ln_1, x_ori)
            heads = block.attn.num_heads
            d = h.shape[-1] // heads
            # SelfSelfAttention.forward: norm over the full width, mean over all tokens
            inv_temp = h.norm(dim=-1).mean(dim=-1).view(-1, 1, 1) * d**-0.5
            if temperature is not None:
                inv_temp = torch.tensor(temperature, dtype=torch.float64)
            q, k, val = _qkv(block, x_ori)

            def ss(zh, vh, inv_temp=inv_temp):
                outs = []
                for z in zh:
                    for _ in range(iterations):
                        z = F.normalize(z, dim=-1)
                        z = torch.softmax(z @ z.transpose(-1, -2) * inv_temp, dim=-1) @ z
                    z = F.normalize(z, dim=-1)
                    outs.append(torch.softmax(z @ z.transpose(-1, -2) * inv_temp, dim=-1) @ vh)
                return (outs[0] + outs[1] + outs[2]) / 3

            mixed = _per_head(lambda qh, kh, vh: ss((qh, kh, vh), vh), heads, q, k, val)
            x_gem = x_gem + _out_proj(block, mixed)  # no FFN on the GEM path
            x_ori = block(x_ori)
        tokens = _vit_head(v, x_gem)[:, 1:]
    return tokens


@pytest.mark.parametrize(
    ("depth", "iterations", "temperature"),
    [(None, 1, None), (1, 1, None), (2, 3, None), (2, 0, 2.5)],
)
def test_gem_follows_the_self_self_attention_path(vit_backend, depth, iterations, temperature):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    tokens = _gem_reference(b, x, depth or 2, iterations, temperature)  # the tiny ViT: 2 blocks
    expected = tokens @ texts.embeddings.double().T
    result = gem(b, x, texts, depth=depth, iterations=iterations, temperature=temperature)
    torch.testing.assert_close(result.maps, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_gem_never_materialises_an_attention_matrix(vit_backend):
    """Its self-self attentions (three per block, each `iterations + 1` products) run fused:
    no tensor the size of the token-by-token probabilities is ever made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b = vit_backend
    x, texts = _batch(b), _texts(b, PROMPTS)
    L = 1 + 4 * 4  # class token and the 4x4 patches of the tiny ViT

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2:] == (L, L):
                    self.square.append(str(func))
            return out

    with Shapes() as seen:
        result = gem(b, x, texts, iterations=2)
    assert seen.square == []
    assert result.maps.shape == (2, 3, 4, 4)


def test_gem_computes_the_last_stock_block_at_the_class_token_alone(vit_backend):
    """The GEM path reads the last block's q, k, v, never its output; the stock embedding
    reads the class token alone, so the last MLP sees that token only."""
    b = vit_backend
    x, texts = _batch(b), _texts(b, PROMPTS)
    mlp = b.model.visual.transformer.resblocks[-1].mlp
    seen = []
    handle = mlp.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    try:
        gem(b, x, texts)
    finally:
        handle.remove()
    assert seen == [1]


def test_gem_refuses_a_depth_beyond_the_tower(vit_backend):
    b = vit_backend
    with pytest.raises(ClipvizError, match="depth=3 is outside 1…2"):
        gem(b, _batch(b), _texts(b, PROMPTS), depth=3)


@pytest.mark.parametrize("method", ["sclip", "naclip", "gem"])
@pytest.mark.parametrize("family", ["pe", "eva", "map"])
def test_self_attention_methods_run_on_rotary_and_map_towers(family_backends, family, method):
    """On timm towers the same paths run through the adapter (RoPE, registers, MAP value path):
    the maps are the cosines of the head's tokens, so they differ from ITSM's and stay in
    [-1, 1]."""
    b = family_backends(family)
    x = _batch(b)
    ours = explain(b, x, PROMPTS, method=method, ensemble=False)
    itsm = explain(b, x, PROMPTS, method="itsm", ensemble=False)
    assert ours.maps.abs().max() <= 1 + 1e-5
    assert not torch.allclose(ours.maps, itsm.maps, atol=1e-4)
    torch.testing.assert_close(ours.scores, itsm.scores)


def test_sclip_without_its_kk_half_is_clearclips_attention_with_residual(vit_backend):
    """Guard on the sum: with only the q-q softmax SCLIP's block would not equal the released
    one (rows of the released attention sum to 2)."""
    b = vit_backend
    x, texts = _batch(b), _texts(b, PROMPTS)
    v, last, x_in = _last_block_input(b, x)
    heads = last.attn.num_heads
    with torch.no_grad():
        q, _, val = _qkv(last, x_in)
        y = x_in + _out_proj(last, _heads_attention(q, q, val, heads))
        y = y + last.mlp(_layer_norm(last.ln_2, y))
        qq_only = _maps(_vit_head(v, y)[:, 1:] @ texts.embeddings.double().T, (4, 4))
    assert not torch.allclose(sclip(b, x, texts).maps, qq_only, atol=1e-4)
