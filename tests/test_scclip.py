"""SC-CLIP against a step-by-step computation of its authors' code (SuleBai/SC-CLIP
`VisionTransformer.forward`, `custom_attn`, `lof_pytorch`, `mean_interpolation`,
`adaptively_aggregate`) on a float64 copy of a four-block tiny ViT, one image at a time."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, random_image, save_random_weights
from reference import _layer_norm, _out_proj, _qkv, _stock_image, _texts, _vit_input

from clipviz import ClipvizError
from clipviz.methods.scclip import anomalous_tokens, scclip

PROMPTS = ["a dog", "a red square", "grass"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deep_vit(tmp_path_factory):
    """A tiny ViT with four blocks and a 6×6 patch grid, so that SC-CLIP's block indices and
    its 30-neighbour outlier factor mean something."""
    from clipviz.backend import load_backend

    root = tmp_path_factory.mktemp("scclip")
    config = json.loads((CONFIGS / "tiny-vit.json").read_text())
    config["vision_cfg"].update(layers=4, image_size=96)
    path = root / "tiny-vit-4.json"
    path.write_text(json.dumps(config))
    weights = save_random_weights(path, root / "tiny-vit-4.safetensors", seed=7)
    return load_backend(model_config=path, pretrained=str(weights), device="cpu")


def _images(backend, n=2):
    return torch.stack([backend.preprocess(random_image(seed=i)) for i in range(n)])


def _lof(x, k):
    """lof_pytorch on one image's tokens `[N, W]`, written out."""
    n = len(x)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    order = d.argsort(dim=1, stable=True)[:, 1 : k + 1]
    near = torch.stack([d[i, order[i]] for i in range(n)])
    reach = torch.maximum(near, near[:, -1:].expand_as(near))
    lrd = k / reach.mean(dim=1)
    return torch.stack([(lrd[order[i]] / lrd[i]).mean() for i in range(n)])


def _fill(tokens, outliers, h, w):
    """mean_interpolation, one position at a time: each outlier becomes the mean of its
    non-outlier 8-neighbours."""
    out = tokens.clone()
    for p in outliers.nonzero().flatten().tolist():
        r, c = divmod(p, w)
        ring = [
            (r + dr) * w + (c + dc)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (dr or dc) and 0 <= r + dr < h and 0 <= c + dc < w
        ]
        ring = [q for q in ring if not outliers[q]]
        if ring:
            out[p] = tokens[ring].mean(dim=0)
    return out


def _aggregate(x, affinity, beta):
    a = affinity.clone()
    a[a < beta] = 0
    return (a / (a.sum(dim=-1, keepdim=True) + 1e-6)) @ x


def _custom_attn(block, x, mid):
    """custom_attn: per head `½ (softmax(3 (mid − mean)) with −∞ below 0 + softmax(k kᵀ/√d)) v`."""
    heads = block.attn.num_heads
    _, k, v = _qkv(block, x)
    d = k.shape[-1] // heads
    m = (mid - mid.mean()) * 3.0
    m[m < 0] = float("-inf")
    m = torch.softmax(m, dim=-1)
    out = []
    for i in range(heads):
        s = slice(i * d, (i + 1) * d)
        kk = torch.softmax(k[:, s] @ k[:, s].T * d**-0.5, dim=-1)
        out.append(((m + kk) / 2) @ v[:, s])
    return _out_proj(block, torch.cat(out, dim=-1))


def _scclip_reference(backend, image, texts, pre, post, start, end, res_cls, beta, k, cont):
    m = copy.deepcopy(backend.model).double()
    vis = m.visual
    blocks = list(vis.transformer.resblocks)
    with torch.no_grad():
        x = _vit_input(vis, image[None].double())[0]  # [1+N, W]
        feats = []
        for block in blocks[:-1]:
            x = block(x[None])[0]
            feats.append(x)
        h = w = 6
        lof = _lof(x[1:], k)
        outliers = lof > torch.quantile(lof, 1 - cont)
        cls = x[:1]
        patches = _fill(x[1:], outliers, h, w)
        f = F.normalize(_fill(feats[pre][1:], outliers, h, w), dim=-1)
        mid = f @ f.T
        patches = _aggregate(patches, mid, beta)
        last = blocks[-1]
        y = _custom_attn(last, patches, mid) + res_cls * cls
        g = F.normalize(feats[post][1:], dim=-1)
        after = g @ g.T
        y = _aggregate(y, after, beta)
        multi = sum(feats[i] for i in range(start, end))
        r = _custom_attn(last, multi[1:], mid) + res_cls * multi[:1]
        y = y + _aggregate(r, after, beta)
        tokens = F.normalize(_layer_norm(vis.ln_post, y) @ vis.proj, dim=-1)
    return (tokens @ texts.embeddings.double().T).T.reshape(-1, h, w)


@pytest.mark.parametrize(
    "options",
    [
        {},  # four blocks: the ViT-B/16 indices scaled (pre 8 → 3, capped at 2; post 1; 1…2)
        {"pre_adjust": 0, "post_adjust": 2, "multi_start": 0, "multi_end": 2, "res_cls": 0.7,
         "beta": 0.1, "neighbours": 5, "contamination": 0.2},
    ],
)  # fmt: skip
def test_scclip_equals_its_authors_forward_step_by_step(deep_vit, options):
    b = deep_vit
    x = _images(b)
    texts = _texts(b, PROMPTS)
    settings = {"pre_adjust": 2, "post_adjust": 1, "multi_start": 1, "multi_end": 3,
                "res_cls": 0.3, "beta": 0.4, "neighbours": 30, "contamination": 0.05}  # fmt: skip
    settings.update(options)
    result = scclip(b, x, texts, **options)
    for i in range(len(x)):
        expected = _scclip_reference(b, x[i], texts, *settings.values())
        torch.testing.assert_close(result.maps[i], expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.image_embeddings, _stock_image(b, x), atol=1e-5, rtol=1e-5)


def test_anomalous_tokens_are_the_far_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, 8, generator=g) * 0.1
    x[0, [3, 17]] += 5.0  # two tokens far from the rest
    assert anomalous_tokens(x, neighbours=10, contamination=0.05).nonzero()[:, 1].tolist() == [
        3,
        17,
    ]


def test_scclip_refuses_block_indices_outside_the_model(deep_vit):
    x = _images(deep_vit, 1)
    texts = _texts(deep_vit, PROMPTS)
    with pytest.raises(ClipvizError, match="pre_adjust=3 is outside 0…2"):
        scclip(deep_vit, x, texts, pre_adjust=3)
    with pytest.raises(ClipvizError, match="multi_start=2, multi_end=2"):
        scclip(deep_vit, x, texts, multi_start=2, multi_end=2)
