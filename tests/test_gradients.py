"""Gradient methods against independent computations: the stock open_clip forward with a hook
that turns the read layer into a leaf, an explicit per-head attention loop written here from
`in_proj_weight`, finite differences in float64, and a per-channel Score-CAM loop."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image

from clipviz import ClipvizError
from clipviz.backend import Texts
from clipviz.maps import normalize_maps
from clipviz.methods import methods
from clipviz.methods.cam import gradcam, gscorecam
from clipviz.methods.relevance import gae, legrad

PROMPTS = ["a dog", "a red square", "grass"]


def _batch(backend, n=2, first_seed=0):
    return torch.stack([backend.preprocess(random_image(seed=first_seed + i)) for i in range(n)])


def _texts(backend, prompts=PROMPTS) -> Texts:
    return backend.encode_texts(prompts, ensemble=False)


def _stock_with_leaf(model, module, image):
    """The stock `encode_image` of one image `[3, H, W]`, with `module`'s output replaced by a
    leaf that requires grad; returns (leaf, unit image embedding `[D]`)."""
    store = {}

    def make_leaf(mod, inputs, output):
        store["leaf"] = output.detach().requires_grad_(True)
        return store["leaf"]

    handle = module.register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            embedding = F.normalize(model.encode_image(image[None]), dim=-1)[0]
    finally:
        handle.remove()
    return store["leaf"], embedding


def _explicit_vit(backend, image):
    """Every block written out per head from `in_proj_weight`: (probs per block `[H, L, L]`,
    outputs per block `[L, W]`), in one graph from the patch embeddings on."""
    v = backend.model.visual
    with torch.enable_grad():
        x = v._embeds(image[None]).requires_grad_(True)
        probs, outputs = [], []
        for block in v.transformer.resblocks:
            attn = block.attn
            L, W = x.shape[1:]
            H = attn.num_heads
            q, k, val = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(
                W, dim=-1
            )
            q, k, val = (t[0].reshape(L, H, W // H).transpose(0, 1) for t in (q, k, val))
            p = torch.softmax(q @ k.transpose(1, 2) / (W // H) ** 0.5, dim=-1)  # [H, L, L]
            heads = (p @ val).transpose(0, 1).reshape(1, L, W)
            x = x + F.linear(heads, attn.out_proj.weight, attn.out_proj.bias)
            x = x + block.mlp(block.ln_2(x))
            probs.append(p)
            outputs.append(x[0])
    return probs, outputs


def _pooled(backend, x):
    v = backend.model.visual
    return F.normalize(v.ln_post(x[0]) @ v.proj, dim=-1)


# -- Grad-CAM ----------------------------------------------------------------------------------


def test_vit_gradcam_equals_gradients_through_the_stock_forward_at_ln_1(vit_backend):
    b = vit_backend
    images, texts = _batch(b), _texts(b)
    result = gradcam(b, images, texts)
    assert result.maps.dtype == torch.float32 and result.maps.shape == (2, 3, 4, 4)

    last_ln_1 = b.model.visual.transformer.resblocks[-1].ln_1
    for i, image in enumerate(images):
        leaf, embedding = _stock_with_leaf(b.model, last_ln_1, image)
        torch.testing.assert_close(result.image_embeddings[i], embedding.detach())
        acts = leaf[0, 1:].detach()  # [N, W]
        for t, text in enumerate(texts.embeddings):
            (grad,) = torch.autograd.grad(embedding @ text, leaf, retain_graph=True)
            alpha = grad[0, 1:].mean(dim=0)  # [W]
            expected = (acts @ alpha).relu().reshape(4, 4)
            torch.testing.assert_close(result.maps[i, t], expected, rtol=1e-4, atol=1e-6)
    assert result.maps.amax() > 0


def test_rn_gradcam_equals_gradients_through_the_stock_forward_at_layer4(rn_backend):
    b = rn_backend
    images, texts = _batch(b), _texts(b)
    result = gradcam(b, images, texts)
    assert result.maps.shape == (2, 3, 2, 2)
    for i, image in enumerate(images):
        leaf, embedding = _stock_with_leaf(b.model, b.model.visual.layer4, image)
        torch.testing.assert_close(result.image_embeddings[i], embedding.detach())
        for t, text in enumerate(texts.embeddings):
            (grad,) = torch.autograd.grad(embedding @ text, leaf, retain_graph=True)
            alpha = grad[0].mean(dim=(1, 2))  # [C]
            expected = (alpha[:, None, None] * leaf[0].detach()).sum(0).relu()
            torch.testing.assert_close(result.maps[i, t], expected, rtol=1e-4, atol=1e-6)


def test_vit_gradcam_weights_equal_float64_finite_differences(vit_backend):
    b = vit_backend
    image, texts = _batch(b, 1), _texts(b, ["a red square"])
    result = gradcam(b, image, texts)

    v = copy.deepcopy(b.model.visual).double()
    *before, last = v.transformer.resblocks
    text = texts.embeddings[0].double()
    with torch.no_grad():
        x = v._embeds(image.double())
        for block in before:
            x = block(x)
        acts = last.ln_1(x)  # [1, 1+N, W]

        def similarity(a):  # the stock last block from its ln_1 output on, for a batch of `a`
            y = x + last.attn(a, a, a, need_weights=False)[0]
            y = y + last.mlp(last.ln_2(y))
            return F.normalize(v.ln_post(y[:, 0]) @ v.proj, dim=-1) @ text

        # d/dε s(A + ε·1_c on the patch tokens) = Σ_patches ∂s/∂A_c = N·α_c
        W = acts.shape[-1]
        step = torch.zeros(W, *acts.shape[1:], dtype=torch.float64)
        step[:, 1:] = 1e-6 * torch.eye(W, dtype=torch.float64)[:, None, :]
        alpha = (similarity(acts + step) - similarity(acts - step)) / 2e-6 / 16  # [W]
    expected = (acts[0, 1:] @ alpha).relu().reshape(4, 4).float()
    torch.testing.assert_close(result.maps[0, 0], expected, rtol=1e-4, atol=1e-6)
    assert expected.amax() > 0


# -- GAE -------------------------------------------------------------------------------------


def _gae_reference(backend, image, texts, start, scale):
    """The notebook's `interpret`: target `scale · cos` (its `logits_per_image` when
    `scale` is the logit scale), relevance from block `start` on."""
    probs, outputs = _explicit_vit(backend, image)
    embedding = _pooled(backend, outputs[-1][None, :1])[0]
    maps = []
    for text in texts.embeddings:
        grads = torch.autograd.grad(scale * embedding @ text, probs[start:], retain_graph=True)
        L = probs[0].shape[-1]
        R = torch.eye(L)
        for p, g in zip(probs[start:], grads, strict=True):
            cam = (g * p.detach()).clamp(min=0).mean(dim=0)
            R = R + cam @ R
        maps.append(R[0, 1:].reshape(4, 4))
    return torch.stack(maps), embedding.detach()


@pytest.mark.parametrize(
    "options,start,logit",
    [
        ({}, 1, True),
        ({"start_layer": 0}, 0, True),
        ({"start_layer": 0, "target": "cosine"}, 0, False),
    ],
)
def test_gae_equals_an_explicit_relevance_loop_over_the_blocks(vit_backend, options, start, logit):
    b = vit_backend
    images, texts = _batch(b), _texts(b)
    result = gae(b, images, texts, **options)
    assert result.maps.shape == (2, 3, 4, 4)
    scale = b.model.logit_scale.exp().item() if logit else 1.0
    for i, image in enumerate(images):
        expected, embedding = _gae_reference(b, image, texts, start, scale)
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result.image_embeddings[i], embedding)
        stock = F.normalize(b.model.encode_image(image[None]), dim=-1)[0]
        torch.testing.assert_close(embedding, stock, rtol=1e-5, atol=1e-5)


def test_gae_defaults_are_the_notebooks_last_block_and_logit(vit_backend):
    b = vit_backend
    images, texts = _batch(b), _texts(b)
    default = gae(b, images, texts).maps
    torch.testing.assert_close(default, gae(b, images, texts, start_layer=1).maps)
    assert not torch.allclose(default, gae(b, images, texts, start_layer=0).maps)
    # with several blocks the relevance is not scale-invariant: logit and cosine differ
    every = dict(start_layer=0)
    cosine_maps = gae(b, images, texts, target="cosine", **every).maps
    assert not torch.allclose(
        normalize_maps(cosine_maps), normalize_maps(gae(b, images, texts, **every).maps)
    )


# -- LeGrad ----------------------------------------------------------------------------------


def _legrad_reference(backend, image, texts, layers, feature="mean"):
    """`compute_legrad_clip`: per layer, `proj(ln_post(mean over all tokens))` (or the class
    token), cosine with the text, positive gradient w.r.t. the attention, mean over heads
    and queries, columns 1:, summed over layers and min-maxed."""
    probs, outputs = _explicit_vit(backend, image)
    maps = []
    for text in texts.embeddings:
        total = torch.zeros(16)
        for block in range(len(probs) - layers, len(probs)):
            x = outputs[block]  # [L, W]
            tokens = x.mean(dim=0, keepdim=True) if feature == "mean" else x[:1]
            s = _pooled(backend, tokens[None])[0] @ text
            (g,) = torch.autograd.grad(s, probs[block], retain_graph=True)
            total += g.clamp(min=0).mean(dim=0).mean(dim=0)[1:]
        maps.append(((total - total.min()) / (total.max() - total.min())).reshape(4, 4))
    return torch.stack(maps)


@pytest.mark.parametrize("layers,feature", [(1, "mean"), (2, "mean"), (2, "class")])
def test_legrad_equals_per_layer_gradients_of_the_full_graph(vit_backend, layers, feature):
    b = vit_backend
    images, texts = _batch(b), _texts(b)
    result = legrad(b, images, texts, layers=layers, feature=feature)
    assert result.maps.shape == (2, 3, 4, 4)
    for i, image in enumerate(images):
        expected = _legrad_reference(b, image, texts, layers, feature)
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-5)
    flat = result.maps.flatten(2)
    torch.testing.assert_close(flat.amin(-1), torch.zeros(2, 3))
    torch.testing.assert_close(flat.amax(-1), torch.ones(2, 3))
    stock = F.normalize(b.model.encode_image(images), dim=-1)  # scores stay the model's own
    torch.testing.assert_close(result.image_embeddings, stock.detach(), rtol=1e-5, atol=1e-5)


def test_legrad_default_feature_is_the_mean_over_tokens(vit_backend):
    b = vit_backend
    images, texts = _batch(b), _texts(b)
    default = legrad(b, images, texts).maps
    torch.testing.assert_close(default, legrad(b, images, texts, feature="mean").maps)
    assert not torch.allclose(default, legrad(b, images, texts, feature="class").maps)


def test_legrad_layers_change_the_map(vit_backend):
    b = vit_backend
    images, texts = _batch(b), _texts(b)
    assert not torch.allclose(
        legrad(b, images, texts, layers=1).maps, legrad(b, images, texts, layers=2).maps
    )


# -- gScoreCAM -------------------------------------------------------------------------------


def _vit_tokens_as_grid(tokens, prefix):
    """The reference's `reshape_transform` for one image: drop the prefix (class) tokens,
    `[N, W]` -> `[W, h, w]`."""
    patches = tokens[prefix:]
    side = int(patches.shape[0] ** 0.5)
    return patches.reshape(side, side, -1).permute(2, 0, 1)


def _gscorecam_reference(backend, image, texts, topk, module=None, prefix=None):
    """`gscore_cam.py` as `predict.py` calls it, one text at a time: masks upsampled with
    `nn.UpsamplingBilinear2d` and normalised with 1e-6; the masked image's raw logit for the
    text; a softmax over all channels, 0 for those not kept. `module` (default `layer4`) is
    the target layer; with `prefix`, its token output is reshaped to a grid as
    `model_loader/clip_loader.py` does for ViTs."""
    model = backend.model
    leaf, embedding = _stock_with_leaf(model, module or model.visual.layer4, image)

    def grid(t):
        return t[0] if prefix is None else _vit_tokens_as_grid(t[0], prefix)

    acts = grid(leaf).detach()  # [C, h, w]
    upsample = torch.nn.UpsamplingBilinear2d(size=image.shape[-2:])
    maps = []
    for text in texts.embeddings:
        (grad,) = torch.autograd.grad(embedding @ text, leaf, retain_graph=True)
        scores = torch.zeros(acts.shape[0])
        for c in grid(grad).mean(dim=(1, 2)).topk(topk).indices:
            up = upsample(acts[c][None, None])[0, 0]
            mask = (up - up.min()) / (up.max() - up.min() + 1e-6)
            with torch.no_grad():
                masked = F.normalize(model.encode_image((image * mask)[None]), dim=-1)[0]
            scores[c] = model.logit_scale.exp() * masked @ text
        weights = torch.softmax(scores, dim=0)
        maps.append((weights[:, None, None] * acts).sum(dim=0).relu())
    return torch.stack(maps)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS[:2]])
def test_gscorecam_equals_the_reference_masking_loop(rn_backend, prompts):
    b = rn_backend
    images, texts = _batch(b), _texts(b, prompts)
    result = gscorecam(b, images, texts, topk=5)
    assert result.maps.shape == (2, len(prompts), 2, 2)
    for i, image in enumerate(images):
        expected = _gscorecam_reference(b, image, texts, topk=5)
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
    assert result.maps.amax() > 0


def test_gscorecam_on_a_conv_tower_equals_the_reference_on_the_final_map(family_backends):
    b = family_backends("convnext")
    trunk = b.model.visual.trunk
    images, texts = _batch(b), _texts(b, PROMPTS[:2])
    result = gscorecam(b, images, texts, topk=5)
    for i, image in enumerate(images):  # the last stage's output is what forward_features returns
        expected = _gscorecam_reference(b, image, texts, 5, module=trunk.stages[-1])
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "map"])
def test_gscorecam_on_vit_tokens_equals_the_reference_on_the_last_block(family, family_backends):
    b = family_backends(family)
    visual = b.model.visual
    last = visual.transformer.resblocks[-1] if family == "vit" else visual.trunk.blocks[-1]
    prefix = 1 if family == "vit" else getattr(visual.trunk, "num_prefix_tokens", 0)
    images, texts = _batch(b), _texts(b, PROMPTS[:2])
    result = gscorecam(b, images, texts, topk=5)
    h, w = b.grid_size(images)
    assert result.maps.shape == (2, 2, h, w)
    for i, image in enumerate(images):
        expected = _gscorecam_reference(b, image, texts, 5, module=last, prefix=prefix)
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
    assert result.maps.amax() > 0


def test_gscorecam_text_softmax_variant_weights_kept_channels_by_prompt_probability(rn_backend):
    b = rn_backend
    image, texts = _batch(b, 1), _texts(b, PROMPTS[:2])
    model = b.model
    leaf, embedding = _stock_with_leaf(model, model.visual.layer4, image[0])
    acts = leaf[0].detach()
    result = gscorecam(b, image, texts, topk=4, score="text_softmax", channel_softmax=False)
    for t, text in enumerate(texts.embeddings):
        (grad,) = torch.autograd.grad(embedding @ text, leaf, retain_graph=True)
        total = torch.zeros(acts.shape[1:])
        for c in grad[0].mean(dim=(1, 2)).topk(4).indices:
            up = torch.nn.UpsamplingBilinear2d(size=image.shape[-2:])(acts[c][None, None])[0, 0]
            mask = (up - up.min()) / (up.max() - up.min() + 1e-6)
            with torch.no_grad():
                masked = F.normalize(model.encode_image(image * mask), dim=-1)[0]
            total += (model.logit_scale.exp() * masked @ texts.embeddings.T).softmax(-1)[t] * acts[
                c
            ]
        torch.testing.assert_close(result.maps[0, t], total.relu(), rtol=1e-4, atol=1e-6)


def test_gscorecam_with_one_prompt_depends_on_the_masked_passes(rn_backend):
    b = rn_backend
    images, texts = _batch(b), _texts(b, PROMPTS[:1])
    assert not torch.allclose(
        gscorecam(b, images, texts, topk=5).maps, gscorecam(b, images, texts, topk=20).maps
    )


def test_gscorecam_topk_changes_the_map_and_batch_size_does_not(rn_backend):
    b = rn_backend
    images, texts = _batch(b), _texts(b, PROMPTS[:2])
    few = gscorecam(b, images, texts, topk=5)
    torch.testing.assert_close(few.maps, gscorecam(b, images, texts, topk=5, batch_size=2).maps)
    assert not torch.allclose(few.maps, gscorecam(b, images, texts, topk=20).maps)


def test_gscorecam_scores_each_kept_channel_once_for_all_texts(rn_backend, monkeypatch):
    b = rn_backend
    image, texts = _batch(b, 1), _texts(b)
    channels = b.model.visual.layer4[-1].bn3.num_features
    masked_images = []

    def cheap_embeddings(x):  # a stand-in for the tower: only the count matters here
        masked_images.append(len(x))
        return F.normalize(x.flatten(1)[:, : texts.embeddings.shape[1]], dim=-1)

    monkeypatch.setattr(b, "image_embeddings", cheap_embeddings)
    gscorecam(b, image, texts, topk=5, batch_size=4)
    assert 5 <= sum(masked_images) <= 5 * len(PROMPTS) and max(masked_images) <= 4
    masked_images.clear()
    everything = gscorecam(b, image, texts, topk=10_000).maps  # clamped to the channel count
    assert sum(masked_images) == channels
    torch.testing.assert_close(everything, gscorecam(b, image, texts, topk=channels).maps)


# -- shared behaviour ------------------------------------------------------------------------

CASES = [
    ("gradcam", "vit", {}),
    ("gradcam", "rn", {}),
    ("gae", "vit", {}),
    ("legrad", "vit", {}),
    ("gscorecam", "rn", {"topk": 8}),
]


def test_methods_run_when_called_under_no_grad(vit_backend):
    images, texts = _batch(vit_backend), _texts(vit_backend)
    expected = gae(vit_backend, images, texts).maps
    with torch.no_grad():
        torch.testing.assert_close(gae(vit_backend, images, texts).maps, expected)


def test_inference_mode_is_a_clear_error(vit_backend):
    images, texts = _batch(vit_backend), _texts(vit_backend)
    with torch.inference_mode(), pytest.raises(ClipvizError, match="inference_mode"):
        gradcam(vit_backend, images, texts)


@pytest.mark.parametrize(
    "fn,tower,message",
    [
        (gae, "rn", "needs a ViT image tower.*clipviz methods"),
        (legrad, "rn", "needs a ViT image tower.*clipviz methods"),
    ],
)
def test_methods_on_the_wrong_tower_say_which_to_use(request, fn, tower, message):
    b = request.getfixturevalue(f"{tower}_backend")
    with pytest.raises(ClipvizError, match=message):
        fn(b, _batch(b, 1), _texts(b))


@pytest.mark.parametrize(
    "fn,tower,options,message",
    [
        (gae, "vit", {"start_layer": 2}, "start_layer=2 is out of range"),
        (gae, "vit", {"start_layer": -3}, "out of range"),
        (legrad, "vit", {"layers": 0}, "layers=0"),
        (legrad, "vit", {"layers": 3}, "layers=3"),
        (gscorecam, "rn", {"topk": 0}, "at least 1"),
        (gscorecam, "rn", {"batch_size": 0}, "at least 1"),
    ],
)
def test_out_of_range_options_are_clear_errors(request, fn, tower, options, message):
    b = request.getfixturevalue(f"{tower}_backend")
    with pytest.raises(ClipvizError, match=message):
        fn(b, _batch(b, 1), _texts(b), **options)


@pytest.mark.parametrize("name,tower,options", CASES)
def test_under_bf16_autocast_maps_are_float32_and_near_the_fp32_ones(request, name, tower, options):
    b = request.getfixturevalue(f"{tower}_backend")
    images, texts = _batch(b), _texts(b)
    fn = methods()[name].fn
    exact = fn(b, images, texts, **options).maps
    low = fn(dataclasses.replace(b, autocast_dtype=torch.bfloat16), images, texts, **options).maps
    assert low.dtype == torch.float32 and low.shape == exact.shape
    assert torch.isfinite(low).all()
    cosine = F.cosine_similarity(low.flatten(1), exact.flatten(1), dim=1)
    assert (cosine > 0.9).all(), cosine
