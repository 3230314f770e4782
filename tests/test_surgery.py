"""CLIP Surgery, MaskCLIP and ClearCLIP against step-by-step computations written from
the method's definition: a float64 copy of the model, explicit per-head loops on `in_proj_weight` slices."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS
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

from clipviz import ClipvizError
from clipviz.backend.towers import TOKENS
from clipviz.methods.surgery import clearclip, feature_surgery, maskclip, surgery

PROMPTS = ["a dog", "a red square", "grass"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _explicit_feature_surgery(tokens, token0, text):
    """The definition literally: materialise `F[b, n, t, :]` and subtract its mean over texts."""
    p = torch.softmax(2 * token0 @ text.T, dim=-1)  # [B, T]
    w = p / p.mean(dim=-1, keepdim=True)
    feats = tokens[:, :, None, :] * text[None, None, :, :] * w[:, None, :, None]  # [B,N,T,D]
    return (feats - feats.mean(dim=2, keepdim=True)).sum(dim=-1)


# -- references --------------------------------------------------------------------------


def _vit_surgery_tokens(backend, x, depth):
    """Two paths from the last `depth` blocks of a float64 copy; returns (patches, token0)."""
    m = copy.deepcopy(backend.model).double()
    v = m.visual
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        orig = _vit_input(v, x.double())
        for block in blocks[: len(blocks) - depth]:
            orig = block(orig)
        new = orig
        for block in blocks[len(blocks) - depth :]:
            _, _, val = _qkv(block, orig)
            new = new + _out_proj(block, _heads_attention(val, val, val, block.attn.num_heads))
            orig = block(orig)  # the stock block: the original path
        new = torch.cat([orig[:, :1], new[:, 1:]], dim=1)
        tokens = _vit_head(v, new)
    return tokens[:, 1:], tokens[:, 0]


def _rn_pool_input(m, x):
    v = m.visual
    feats = v.forward_intermediates(x, indices=[4], intermediates_only=True)
    f = feats["image_intermediates"][-1]  # [B, C, h, w]
    seq = f.flatten(2).transpose(1, 2)  # [B, N, C]
    pos = v.attnpool.positional_embedding  # the tiny models run at their native grid
    return f, torch.cat([seq.mean(1, keepdim=True), seq], dim=1) + pos


def _rn_surgery_tokens(backend, x):
    m = copy.deepcopy(backend.model).double()
    pool = m.visual.attnpool
    with torch.no_grad():
        _, seq = _rn_pool_input(m, x.double())
        val = seq @ pool.v_proj.weight.T + pool.v_proj.bias
        out = _heads_attention(val, val, val, pool.num_heads)
        tokens = F.normalize(out @ pool.c_proj.weight.T + pool.c_proj.bias, dim=-1)
        token0 = F.normalize(m.encode_image(x.double()), dim=-1)
    return tokens[:, 1:], token0


# -- feature surgery ---------------------------------------------------------------------


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_feature_surgery_equals_the_explicit_btnd_formula():
    tokens, token0, text = _unit(3, 7, 16), _unit(3, 16, seed=1), _unit(4, 16, seed=2)
    expected = _explicit_feature_surgery(tokens, token0, text)
    torch.testing.assert_close(feature_surgery(tokens, token0, text), expected)


def test_feature_surgery_weights_the_texts_per_image():
    tokens, token0, text = _unit(3, 7, 16), _unit(3, 16, seed=1), _unit(4, 16, seed=2)
    batched = feature_surgery(tokens, token0, text)
    for b in range(3):
        single = feature_surgery(tokens[b : b + 1], token0[b : b + 1], text)
        torch.testing.assert_close(batched[b : b + 1], single)
    # the weights really differ per image: using image 0's token0 for all changes the result
    shared = feature_surgery(tokens, token0[:1].expand(3, -1), text)
    assert not torch.allclose(batched[1:], shared[1:])


def test_feature_surgery_of_one_text_subtracts_the_redundant_feature():
    tokens, token0, text, r = _unit(2, 5, 8), _unit(2, 8, seed=1), _unit(1, 8, seed=2), _unit(8)
    got = feature_surgery(tokens, token0, text, r)
    torch.testing.assert_close(got, tokens @ (text - r).T)
    with pytest.raises(ClipvizError, match="redundant"):
        feature_surgery(tokens, token0, text)


# -- architecture surgery ----------------------------------------------------------------


def test_vit_surgery_equals_two_path_reference(vit_backend):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    result = surgery(b, x, texts)  # the default 6 blocks: all 2 of the tiny model
    patches, token0 = _vit_surgery_tokens(b, x, depth=2)
    expected = _explicit_feature_surgery(patches, token0, texts.embeddings.double())
    assert result.maps.dtype == torch.float32 and result.maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(result.maps, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_vit_surgery_depth_selects_the_blocks_with_two_paths(vit_backend):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    one = surgery(b, x, texts, depth=1).maps
    two = surgery(b, x, texts, depth=2).maps
    patches, token0 = _vit_surgery_tokens(b, x, depth=1)
    expected = _explicit_feature_surgery(patches, token0, texts.embeddings.double())
    torch.testing.assert_close(one, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one, two, atol=1e-3)
    for depth in (0, 3, 50):  # the tiny ViT has 2 blocks
        with pytest.raises(ClipvizError, match=f"depth={depth} is outside 1…2"):
            surgery(b, x, texts, depth=depth)


def test_rn_surgery_equals_vv_attention_pool_reference(rn_backend):
    b = rn_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    result = surgery(b, x, texts)
    patches, token0 = _rn_surgery_tokens(b, x)
    expected = _explicit_feature_surgery(patches, token0, texts.embeddings.double())
    torch.testing.assert_close(result.maps, _maps(expected, (2, 2)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ensemble", [False, True])
def test_surgery_of_one_prompt_subtracts_the_empty_prompt(backend, ensemble):
    x = _batch(backend)
    texts = _texts(backend, ["a red square"], ensemble=ensemble)
    r = _texts(backend, [""], ensemble=ensemble).embeddings.double()
    if backend.tower == TOKENS:
        patches, _ = _vit_surgery_tokens(backend, x, depth=2)
    else:
        patches, _ = _rn_surgery_tokens(backend, x)
    expected = patches @ (texts.embeddings.double() - r).T
    grid = backend.grid_size(x)
    got = surgery(backend, x, texts).maps
    torch.testing.assert_close(got, _maps(expected, grid), atol=1e-5, rtol=1e-5)


def test_layer_scale_applies_to_the_new_path(tmp_path):
    from clipviz.backend import load_backend

    cfg = json.loads((CONFIGS / "tiny-vit.json").read_text())
    cfg["vision_cfg"]["ls_init_value"] = 0.5
    path = tmp_path / "tiny-vit-ls.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(3)
    b = load_backend(model_config=path, pretrained="random", device="cpu", text_cache=False)
    last = b.model.visual.transformer.resblocks[-1]
    with torch.no_grad():  # this test's own model: give layer scale distinct channel values
        last.ls_1.gamma.copy_(torch.rand_like(last.ls_1.gamma) + 0.1)
    x = _batch(b)
    texts = _texts(b, PROMPTS)

    m = copy.deepcopy(b.model).double()
    v = m.visual
    blk = list(v.transformer.resblocks)[-1]
    with torch.no_grad():
        x_in = list(v.transformer.resblocks)[0](_vit_input(v, x.double()))
        _, _, val = _qkv(blk, x_in)
        new = x_in + blk.ls_1.gamma * _out_proj(
            blk, _heads_attention(val, val, val, blk.attn.num_heads)
        )
        new = torch.cat([blk(x_in)[:, :1], new[:, 1:]], dim=1)
        tokens = _vit_head(v, new)
    expected = _explicit_feature_surgery(tokens[:, 1:], tokens[:, 0], texts.embeddings.double())
    got = surgery(b, x, texts, depth=1).maps
    torch.testing.assert_close(got, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)


# -- MaskCLIP / ClearCLIP ----------------------------------------------------------------


def test_vit_maskclip_equals_value_path_of_the_last_block(vit_backend):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    m = copy.deepcopy(b.model).double()
    v = m.visual
    first, last = list(v.transformer.resblocks)
    with torch.no_grad():
        x_in = first(_vit_input(v, x.double()))
        _, _, val = _qkv(last, x_in)
        y = x_in + _out_proj(last, val)  # each token attends only to itself
        y = y + last.mlp(_layer_norm(last.ln_2, y))
        tokens = _vit_head(v, y)[:, 1:]
    expected = tokens @ texts.embeddings.double().T
    result = maskclip(b, x, texts)
    torch.testing.assert_close(result.maps, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_rn_maskclip_equals_v_then_c_projection_of_layer4(rn_backend):
    b = rn_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    m = copy.deepcopy(b.model).double()
    pool = m.visual.attnpool
    with torch.no_grad():
        f, _ = _rn_pool_input(m, x.double())
        per_position = f.flatten(2).transpose(1, 2)  # [B, N, C]
        val = per_position @ pool.v_proj.weight.T + pool.v_proj.bias
        tokens = F.normalize(val @ pool.c_proj.weight.T + pool.c_proj.bias, dim=-1)
    expected = tokens @ texts.embeddings.double().T
    result = maskclip(b, x, texts)
    torch.testing.assert_close(result.maps, _maps(expected, (2, 2)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_vit_clearclip_equals_qq_attention_without_residual_or_mlp(vit_backend):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    m = copy.deepcopy(b.model).double()
    v = m.visual
    first, last = list(v.transformer.resblocks)
    with torch.no_grad():
        x_in = first(_vit_input(v, x.double()))
        q, _, val = _qkv(last, x_in)
        y = _out_proj(last, _heads_attention(q, q, val, last.attn.num_heads))
        tokens = _vit_head(v, y)[:, 1:]
    expected = tokens @ texts.embeddings.double().T
    result = clearclip(b, x, texts)
    torch.testing.assert_close(result.maps, _maps(expected, (4, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)
    # q-q attention is not the value path: the two methods give different maps
    assert not torch.allclose(result.maps, maskclip(b, x, texts).maps, atol=1e-3)


def test_clearclip_refuses_resnets_with_a_way_out(rn_backend):
    with pytest.raises(ClipvizError, match="needs a ViT.*clipviz methods"):
        clearclip(rn_backend, _batch(rn_backend), _texts(rn_backend, PROMPTS))
