"""ResCLIP against a step-by-step computation of its authors' code (yvhangyang/ResCLIP
`VisionTransformer.forward`, `custom_attn` with arch 'wo_resi' and attn_strategy 'resclip',
`create_logit_temp`, `create_patch_matrix`, `generate_attention_sfr`, `check_path`) on a
float64 copy of a four-block tiny ViT, one image at a time, pair by pair."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from reference import _layer_norm, _out_proj, _qkv, _stock_image, _texts, _vit_input
from test_scclip import _images, deep_vit  # noqa: F401 (a fixture)

from clipviz import ClipvizError
from clipviz.methods.resclip import resclip
from clipviz.segment.pamr import pamr

PROMPTS = ["a dog", "a red square", "grass"]
H = W = 6  # the deep ViT's patch grid
PATCH = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _prior(std):
    """NACLIP's Gaussian addition `[1+N, 1+N]`, 0 in the class token's row and column."""
    out = torch.zeros(1 + H * W, 1 + H * W, dtype=torch.float64)
    for i in range(H * W):
        for j in range(H * W):
            d2 = (i // W - j // W) ** 2 + (i % W - j % W) ** 2
            out[1 + i, 1 + j] = math.exp(-d2 / (2 * std**2))
    return out


def _heads(t, heads):
    return t[0].view(t.shape[1], heads, -1).transpose(0, 1)  # [heads, L, d]


def _patch_labels(image, cos, logit_scale, temp_thd):
    """create_logit_temp's segmentation and create_patch_matrix: the mode of each patch."""
    up = F.interpolate(cos[None], size=image.shape[-2:], mode="bilinear", align_corners=False)
    probs = torch.softmax(pamr(image[None].double(), up, 10, (8, 16))[0] * logit_scale, dim=0)
    pred = probs.argmax(0)
    pred[probs.max(0)[0] < temp_thd] = 0
    labels = torch.zeros(H, W, dtype=torch.long)
    for r in range(H):
        for c in range(W):
            cell = pred[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].flatten()
            labels[r, c] = torch.mode(cell)[0]
    return labels


def _sfr(labels, std, keep_entity):
    """generate_attention_sfr, pair by pair."""
    n = H * W
    longest = max(H, W) - 1
    t = torch.linspace(0, 1, steps=longest + 1)
    same = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            a, b = (i // W, i % W), (j // W, j % W)
            same[i, j] = float(labels[a] == labels[b])
            if keep_entity and same[i, j]:
                steps = max(abs(a[0] - b[0]), abs(a[1] - b[1]))
                ok = True
                for s in range(steps + 1):
                    p = [
                        int(torch.round(torch.tensor(float(a[e])) * (1 - t[s]) + b[e] * t[s]))
                        for e in range(2)
                    ]
                    ok = ok and bool(labels[p[0], p[1]] == labels[a])
                if not ok:
                    same[i, j] *= math.exp(-steps / longest)
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    blurred = torch.zeros_like(same)
    for j in range(n):
        for u in range(size):
            src = j + u - size // 2
            if 0 <= src < n:
                blurred[:, j] += kernel[u] * same[:, src]
    blurred = blurred.clamp(min=0)
    out = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    out[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return out / out.max()


def _resclip_reference(backend, image, texts, o):
    m = copy.deepcopy(backend.model).double()
    vis = m.visual
    blocks = list(vis.transformer.resblocks)
    heads = blocks[0].attn.num_heads
    with torch.no_grad():
        x = _vit_input(vis, image[None].double())
        kept = []
        for i, block in enumerate(blocks[:-1]):
            q, k, v = (_heads(t, heads) for t in _qkv(block, x))
            probs = torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
            if o["rcs_start"] <= i < o["rcs_end"]:
                kept.append(probs)
            x = x + _out_proj(block, (probs @ v).transpose(0, 1).reshape(1, x.shape[1], -1))
            x = x + block.mlp(_layer_norm(block.ln_2, x))
        rcs = sum(kept) / len(kept)
        last = blocks[-1]
        _, k, v = (_heads(t, heads) for t in _qkv(last, x))
        omega = _prior(o["std"])

        def custom_attn(sfr):
            logits = k @ k.transpose(1, 2) * k.shape[-1] ** -0.5
            if sfr is not None:
                logits = o["sfr_tau"] * ((1 - o["sfr_lambda"]) * logits + o["sfr_lambda"] * sfr)
            probs = torch.softmax(logits + omega, dim=-1)
            probs = o["rcs_tau"] * ((1 - o["rcs_lambda"]) * probs + o["rcs_lambda"] * rcs)
            return _out_proj(last, (probs @ v).transpose(0, 1).reshape(1, x.shape[1], -1))[0]

        def cosines(y):
            tokens = F.normalize(_layer_norm(vis.ln_post, y) @ vis.proj, dim=-1)[1:]
            return (tokens @ texts.embeddings.double().T).T.reshape(-1, H, W)

        labels = _patch_labels(image, cosines(custom_attn(None)), o["logit_scale"], o["temp_thd"])
        sfr = _sfr(labels, o["std"], o["keep_entity"])
        return cosines(custom_attn(sfr)), labels, sfr


DEFAULTS = {"rcs_start": 2, "rcs_end": 3, "std": 5.0, "temp_thd": 0.11, "rcs_tau": 2.0,
            "rcs_lambda": 0.4, "sfr_tau": 1.8, "sfr_lambda": 0.7, "keep_entity": True,
            "logit_scale": 40.0}  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {},  # four blocks: RCS over block 2 (the reference's 5…8 scaled)
        {"rcs_start": 0, "rcs_end": 2, "std": 1.5, "temp_thd": 0.6, "rcs_tau": 1.5,
         "rcs_lambda": 0.6, "sfr_tau": 2.2, "sfr_lambda": 0.3, "keep_entity": False,
         "logit_scale": 60.0},
    ],
)  # fmt: skip
def test_resclip_equals_its_authors_forward_step_by_step(deep_vit, options):  # noqa: F811
    b = deep_vit
    x = _images(b)
    texts = _texts(b, PROMPTS)
    settings = {**DEFAULTS, **options}
    result = resclip(b, x, texts, **options)
    for i in range(len(x)):
        expected, labels, sfr = _resclip_reference(b, x[i], texts, settings)
        assert len(labels.unique()) > 1  # the same-label attention is not uniform
        torch.testing.assert_close(result.maps[i], expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_resclip_without_rcs_and_sfr_is_naclip(deep_vit):  # noqa: F811
    from clipviz.methods.selfattention import naclip

    x = _images(deep_vit)
    texts = _texts(deep_vit, PROMPTS)
    plain = resclip(deep_vit, x, texts, rcs=False, sfr=False)
    torch.testing.assert_close(plain.maps, naclip(deep_vit, x, texts).maps)
    assert not torch.allclose(resclip(deep_vit, x, texts).maps, plain.maps, atol=1e-3)


def test_resclip_refuses_rcs_blocks_outside_the_model(deep_vit):  # noqa: F811
    x = _images(deep_vit, 1)
    with pytest.raises(ClipvizError, match="rcs_start=2, rcs_end=2"):
        resclip(deep_vit, x, _texts(deep_vit, PROMPTS), rcs_start=2, rcs_end=2)
