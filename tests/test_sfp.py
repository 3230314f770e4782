"""SFP against a step-by-step computation of its authors' code (Kimsure/SFP
`SFP_ICCV/clip/model.py`: `VisionTransformer.forward` with pm 'SOM', `custom_attn`,
`sinkhorn_attn`, `mean_interpolation`, `adaptively_aggregate`) on a float64 copy of a
four-block tiny ViT, one image at a time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from reference import _layer_norm, _out_proj, _qkv, _stock_image, _texts, _vit_input
from test_scclip import _aggregate, _fill, _images, deep_vit  # noqa: F401 (a fixture)

from clipviz import ClipvizError
from clipviz.methods.sfp import sfp

PROMPTS = ["a dog", "a red square", "grass"]
H = W = 6

pytestmark = pytest.mark.usefixtures("one_thread")


def _heads(t, heads):
    return t[0].view(t.shape[1], heads, -1).transpose(0, 1)  # [heads, L, d]


def _merge(t):
    return t.transpose(0, 1).reshape(t.shape[1], -1)  # [L, W]


def _affinity_softmax(sim):
    m = (sim - sim.mean()) * 3.0
    m[m < 0] = float("-inf")
    return torch.softmax(m, dim=-1)


def _sfp_reference(backend, image, texts, pre, post, start, end, res_cls, beta, count):
    m = copy.deepcopy(backend.model).double()
    vis = m.visual
    blocks = list(vis.transformer.resblocks)
    heads = blocks[0].attn.num_heads
    with torch.no_grad():
        x = _vit_input(vis, image[None].double())
        hidden = []
        for block in blocks[:-1]:
            q, k, v = (_heads(t, heads) for t in _qkv(block, x))
            attn = torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
            x = x + _out_proj(block, _merge(attn @ v)[None])
            x = x + block.mlp(_layer_norm(block.ln_2, x))
            hidden.append(x[0])
        # the outlier test on the second-to-last block's attention (class row scaled by 1.5)
        attn = attn.clone()
        attn[:, 0, 1:] *= res_cls * 5.0
        attn = attn.mean(dim=0)
        cls_to_patch, patch_self = attn[0, 1:], torch.diag(attn[1:, 1:])
        salient = (cls_to_patch > patch_self).nonzero().flatten()
        order = torch.sort(cls_to_patch[salient], descending=True).indices
        outliers = torch.zeros(H * W, dtype=torch.bool)
        outliers[salient[order[:count]]] = True
        x = x[0]
        patches = _fill(x[1:], outliers, H, W)
        f = F.normalize(_fill(hidden[pre][1:], outliers, H, W), dim=-1)
        pre_sim = f @ f.T
        pre_sim[pre_sim < beta] = 0.0
        patches = _aggregate(patches, pre_sim, beta)
        last = blocks[-1]
        q, k, v = (_heads(t, heads) for t in _qkv(last, patches[None]))
        scale = q.shape[-1] ** -0.5
        three = (
            torch.softmax(k @ k.transpose(1, 2) * scale, dim=-1)
            + torch.softmax(q @ q.transpose(1, 2) * scale, dim=-1)
            + _affinity_softmax(pre_sim)
        ) / 3
        y = _out_proj(last, _merge(three @ v)) + res_cls * x[:1]
        g = F.normalize(hidden[post][1:], dim=-1)
        post_sim = g @ g.T
        post_sim[post_sim < beta] = 0.0
        y = _aggregate(y, post_sim, beta)
        multi = sum(hidden[i] for i in range(start, end))
        _, _, v = (_heads(t, heads) for t in _qkv(last, multi[None, 1:]))
        r = _out_proj(last, _merge(_affinity_softmax(pre_sim) @ v)) + res_cls * multi[:1]
        y = y + _aggregate(r, post_sim, beta)
        tokens = F.normalize(_layer_norm(vis.ln_post, y) @ vis.proj, dim=-1)
    return (tokens @ texts.embeddings.double().T).T.reshape(-1, H, W), int(outliers.sum())


@pytest.mark.parametrize(
    "options",
    [
        {},  # four blocks: the reference's blocks 8, 3, 3…9 scaled (capped at 2; 1; 1…2)
        {"pre_adjust": 0, "post_adjust": 2, "multi_start": 0, "multi_end": 2, "res_cls": 1.0,
         "beta": 0.1, "outliers": 3},
    ],
)  # fmt: skip
def test_sfp_equals_its_authors_forward_step_by_step(deep_vit, options):  # noqa: F811
    b = deep_vit
    x = _images(b)
    texts = _texts(b, PROMPTS)
    settings = {"pre_adjust": 2, "post_adjust": 1, "multi_start": 1, "multi_end": 3,
                "res_cls": 0.3, "beta": 0.4, "outliers": 10}  # fmt: skip
    settings.update(options)
    result = sfp(b, x, texts, **options)
    for i in range(len(x)):
        expected, filled = _sfp_reference(b, x[i], texts, *settings.values())
        assert filled > 0  # the purification is exercised
        torch.testing.assert_close(result.maps[i], expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_sfp_refuses_block_indices_outside_the_model(deep_vit):  # noqa: F811
    x = _images(deep_vit, 1)
    with pytest.raises(ClipvizError, match="post_adjust=3 is outside 0…2"):
        sfp(deep_vit, x, _texts(deep_vit, PROMPTS), post_adjust=3)


def test_sfp_maps_stay_finite_when_the_patches_are_nearly_identical(vit_backend):
    # a 2×2 grid of the tiny ViT where the patch affinities all round to about 1 and one
    # row falls under their mean everywhere, its own cosine included
    x = vit_backend.preprocess(random_image(seed=0))[None, :, 32:64, 16:48]
    maps = sfp(vit_backend, x, _texts(vit_backend, PROMPTS)).maps
    assert torch.isfinite(maps).all()
