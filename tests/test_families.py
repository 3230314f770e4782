"""timm image towers through open_clip (SigLIP-style MAP heads, PE-Core and EVA with rotary
positions, ConvNeXt, FastViT) against timm's own forward: the adapters' tokens, attention and
heads, and the methods that read them, recomputed from timm's public pieces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, HF_FAMILIES, random_image

import clipviz
from clipviz import ClipvizError
from clipviz.methods.cam import gradcam
from clipviz.methods.relevance import EMPTY_PROMPT, legrad

TIMM_VITS = ("map", "pe", "eva", "reg4")
PROMPTS = ["a dog", "a square"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(b, n=2):
    return torch.stack([b.preprocess(random_image(seed=20 + i)) for i in range(n)])


def _texts(b, prompts=PROMPTS):
    return b.encode_texts(prompts, ensemble=False)


@pytest.mark.parametrize("family", FAMILIES + HF_FAMILIES)
def test_image_embeddings_are_the_models_own_and_token_0_of_the_dense_tokens(
    family_backends, family
):
    b = family_backends(family)
    x = _batch(b)
    embeddings = b.image_embeddings(x)  # computed from the pooled token alone
    torch.testing.assert_close(embeddings, b.dense_tokens(x)[:, 0], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        stock = F.normalize(b.model.encode_image(x), dim=-1)
    torch.testing.assert_close(embeddings, stock, atol=1e-5, rtol=1e-4)


def _after_pool(visual, pooled):
    t = visual.trunk
    return visual.head(t.head(t.fc_norm(pooled)))


def _reference_patch_tokens(b, x):
    """Per-patch joint-space tokens from timm's own `forward_features` and the head's
    weights: the MAP probe's value path, or the pooled path applied to each patch."""
    visual = b.model.visual
    t = visual.trunk
    with torch.no_grad():
        feats = t.forward_features(x)  # timm's forward, final norm included
        patches = feats[:, t.num_prefix_tokens :]
        if t.attn_pool is not None:
            pool = t.attn_pool
            C = patches.shape[-1]
            v = patches @ pool.kv.weight[C:].T + pool.kv.bias[C:]
            y = v @ pool.proj.weight.T + pool.proj.bias
            patches = y + pool.mlp(pool.norm(y))
        return F.normalize(_after_pool(visual, patches), dim=-1)


@pytest.mark.parametrize("family", TIMM_VITS)
def test_timm_vit_itsm_is_the_cosine_of_timms_own_tokens_through_the_head(family_backends, family):
    b = family_backends(family)
    x = _batch(b)
    texts = _texts(b)
    exp = clipviz.explain(b, x, texts, "itsm")
    tokens = _reference_patch_tokens(b, x)
    h, w = b.grid_size(x)
    expected = (tokens @ texts.embeddings.T).transpose(1, 2).reshape(2, 2, h, w)
    torch.testing.assert_close(exp.maps, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        image = F.normalize(b.model.encode_image(x), dim=-1)
    torch.testing.assert_close(exp.scores, image @ texts.embeddings.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TIMM_VITS)
def test_explicit_attention_reproduces_timms_blocks_and_their_probabilities(
    family_backends, family
):
    b = family_backends(family)
    vit = b.vit
    x = vit.embed(_batch(b))
    trunk = copy.deepcopy(b.model.visual.trunk)
    captured = []
    for block in trunk.blocks:
        block.attn.fused_attn = False  # timm's own unfused path materialises the attention
        block.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    rope = trunk.rope.get_embed() if getattr(trunk, "rope", None) is not None else None
    with torch.no_grad():
        for i, block in enumerate(trunk.blocks):
            stock = block(x) if rope is None else block(x, rope=rope)
            explicit, probs = vit.block_with_attention(i, x)
            torch.testing.assert_close(explicit, stock, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(probs, captured[-1], atol=1e-6, rtol=1e-4)
            x = stock


def test_register_tokens_are_prefix_tokens_between_the_class_token_and_the_patches(
    family_backends,
):
    b = family_backends("reg4")
    vit = b.readout_vit
    assert b.family == "timm VisionTransformer, 4 registers, token head"
    assert (vit.prefix, vit.readout, b.grid_size(_batch(b))) == (5, "class", (4, 4))
    x = _batch(b)
    trunk = b.model.visual.trunk
    with torch.no_grad():
        stream = vit.run_blocks(vit.embed(x))
        torch.testing.assert_close(trunk.norm(stream), trunk.forward_features(x))
        # the stream's registers are timm's own, after the class token and before the patches
        first = vit.embed(x)
        torch.testing.assert_close(vit.register_tokens(first), trunk.reg_token.expand(2, -1, -1))
        torch.testing.assert_close(first[:, 0], trunk.cls_token[:, 0].expand(2, -1))


def test_siglip_probabilities_are_a_sigmoid_per_prompt(family_backends):
    b = family_backends("map")
    x = _batch(b)
    texts = _texts(b, ["a dog", "a square", "grass"])
    exp = clipviz.explain(b, x, texts, "itsm")
    with torch.no_grad():
        image = F.normalize(b.model.encode_image(x), dim=-1)
        logits = b.model.logit_scale.exp() * image @ texts.embeddings.T + b.model.logit_bias
    torch.testing.assert_close(exp.probs, torch.sigmoid(logits), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(exp.probs.sum(dim=1), torch.ones(2))  # not a softmax


def test_map_attention_is_the_probes_attention_over_the_patches(family_backends):
    b = family_backends("map")
    x = _batch(b)
    exp = clipviz.explain(b, x, ["a dog"], "attention")
    t = b.model.visual.trunk
    pool = t.attn_pool
    with torch.no_grad():
        feats = t.forward_features(x)[:, t.num_prefix_tokens :]
        B, N, C = feats.shape
        H = pool.num_heads
        q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, 1, H, C // H).transpose(1, 2)
        k = (feats @ pool.kv.weight[:C].T + pool.kv.bias[:C]).reshape(B, N, H, C // H)
        probs = torch.softmax((q * (C // H) ** -0.5) @ k.permute(0, 2, 3, 1), dim=-1)
    h, w = b.grid_size(x)
    torch.testing.assert_close(exp.maps[:, 0], probs.mean(dim=(1, 2)).reshape(B, h, w))


def _legrad_siglip_reference(b, image, text, layers, correction=True, threshold=0.8):
    """`compute_legrad_siglip` written out: the probe on each of the last blocks' outputs
    (no final norm), gradient on its attention, heads averaged, latent row 0; the empty
    prompt's map zeroes where it exceeds the threshold; min-max."""
    visual = copy.deepcopy(b.model.visual)
    t = visual.trunk
    outputs = []
    for block in t.blocks[len(t.blocks) - layers :]:
        block.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        t.forward_features(image[None])  # timm's forward; the hooks keep the blocks' outputs
    pool = t.attn_pool
    empty = F.normalize(b.model.encode_text(b.tokenizer([EMPTY_PROMPT])), dim=-1)[0].detach()

    def relevance(target):
        total = torch.zeros(1)
        for tokens in outputs:
            feats = tokens[:, t.num_prefix_tokens :]
            B, N, C = feats.shape
            H = pool.num_heads
            q = pool.q(pool.latent).reshape(1, 1, H, C // H).transpose(1, 2)
            kv = pool.kv(feats).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
            probs = torch.softmax((q * (C // H) ** -0.5) @ kv[0].transpose(-2, -1), dim=-1)
            probs = probs.detach().requires_grad_(True)  # the reference keeps them to differentiate
            out = pool.proj((probs @ kv[1]).transpose(1, 2).reshape(B, 1, C))
            out = out + pool.mlp(pool.norm(out))
            pooled = F.normalize(_after_pool(visual, out[:, 0]), dim=-1)
            with torch.enable_grad():
                (g,) = torch.autograd.grad((pooled @ target).sum(), probs)
            total = total + g.clamp(min=0).mean(dim=1)[:, 0]
        return total[0]

    res = relevance(text)
    if correction:
        e = relevance(empty)
        e = (e - e.min()) / (e.max() - e.min())
        res = res.masked_fill(e > threshold, 0)
    return ((res - res.min()) / (res.max() - res.min())).detach()


@pytest.mark.parametrize("correction", [True, False])
def test_legrad_on_a_map_head_follows_compute_legrad_siglip(family_backends, correction):
    b = family_backends("map")
    x = _batch(b)
    texts = _texts(b)
    result = legrad(b, x, texts, layers=2, correction=correction)
    h, w = b.grid_size(x)
    for i in range(2):
        for j, text in enumerate(texts.embeddings):
            expected = _legrad_siglip_reference(b, x[i], text, 2, correction).reshape(h, w)
            torch.testing.assert_close(result.maps[i, j], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["convnext", "fastvit"])
def test_conv_itsm_applies_the_head_at_every_location(family_backends, family):
    b = family_backends(family)
    x = _batch(b)
    texts = _texts(b)
    exp = clipviz.explain(b, x, texts, "itsm")
    visual = b.model.visual
    t = visual.trunk
    with torch.no_grad():
        f = t.forward_features(x)  # [B, C, h, w]
        if getattr(t.head, "norm", None) is not None:
            f = F.layer_norm(f.permute(0, 2, 3, 1), (f.shape[1],), t.head.norm.weight,
                             t.head.norm.bias, t.head.norm.eps).permute(0, 3, 1, 2)  # fmt: skip
        loc = f.flatten(2).transpose(1, 2)
        loc = visual.head(t.head.fc(loc) if hasattr(t.head, "fc") else loc)
        image = F.normalize(b.model.encode_image(x), dim=-1)
    tokens = F.normalize(loc, dim=-1)
    h, w = b.grid_size(x)
    expected = (tokens @ texts.embeddings.T).transpose(1, 2).reshape(2, 2, h, w)
    torch.testing.assert_close(exp.maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exp.scores, image @ texts.embeddings.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["fastvit", "swin"])
def test_location_tokens_average_to_the_embedding(family_backends, family):
    # everything after FastViT's and Swin's pooling is affine: the mean location token is the
    # embedding
    b = family_backends(family)
    x = _batch(b)
    with torch.no_grad():
        mean_token = b.vision.tokens(x)[:, 1:].mean(dim=1)
        torch.testing.assert_close(mean_token, b.model.encode_image(x), atol=1e-5, rtol=1e-4)


def test_conv_gradcam_equals_gradients_through_timms_forward(family_backends):
    b = family_backends("convnext")
    images, texts = _batch(b), _texts(b)
    result = gradcam(b, images, texts)
    t = b.model.visual.trunk
    for i, image in enumerate(images):
        store = {}

        def leaf(module, inputs, output, store=store):
            store["leaf"] = output.detach().requires_grad_(True)
            return store["leaf"]

        handle = t.norm_pre.register_forward_hook(leaf)  # the final feature map
        try:
            with torch.enable_grad():
                emb = F.normalize(b.model.encode_image(image[None]), dim=-1)[0]
        finally:
            handle.remove()
        for j, text in enumerate(texts.embeddings):
            (g,) = torch.autograd.grad(emb @ text, store["leaf"], retain_graph=True)
            alpha = g[0].mean(dim=(1, 2))
            expected = (alpha[:, None, None] * store["leaf"][0].detach()).sum(0).relu()
            torch.testing.assert_close(result.maps[i, j], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, -2])
def test_conv_gradcam_at_a_stage_equals_gradients_through_the_later_stages(family_backends, layer):
    """ConvNeXt: the stage's output from `forward_intermediates`, then the later stages,
    `norm_pre` and the head run here by hand."""
    b = family_backends("convnext")
    images, texts = _batch(b), _texts(b)
    result = gradcam(b, images, texts, layer=layer)
    t = b.model.visual.trunk
    stage = layer % len(t.stages)
    with torch.no_grad():
        (read,) = t.forward_intermediates(images, indices=[stage], intermediates_only=True)
    read = read.detach().requires_grad_(True)
    with torch.enable_grad():
        x = read
        for s in t.stages[stage + 1 :]:
            x = s(x)
        emb = F.normalize(b.model.visual.head(t.forward_head(t.norm_pre(x))), dim=-1)
        for j, text in enumerate(texts.embeddings):
            (g,) = torch.autograd.grad((emb @ text).sum(), read, retain_graph=True)
            alpha = g.mean(dim=(2, 3), keepdim=True)
            expected = (alpha * read.detach()).sum(1).relu()
            torch.testing.assert_close(result.maps[:, j], expected, atol=1e-6, rtol=1e-4)
    assert result.maps.shape[-2:] == read.shape[-2:]  # the stage's own grid


def test_coca_pooler_read_as_a_probe_is_open_clips_own(family_backends):
    """CoCa: the contrastive query's attention equals what the pooler's MultiheadAttention
    returns, its output through `ln_post` and `proj` the model's embedding, and a patch's
    dense token the pooler's output when only that patch may be attended to."""
    b = family_backends("coca")
    x = _batch(b)
    v, visual = b.vision, b.model.visual
    pool = visual.attn_pool
    with torch.no_grad():
        tokens = v.run_blocks(v.embed(x))
        kx = pool.ln_k(tokens)
        q = pool.ln_q(pool.query)[None].expand(len(x), -1, -1)
        _, weights = pool.attn(q, kx, kx, need_weights=True, average_attn_weights=False)
        probs = v.latent_probs(v.pool_input(tokens))
        torch.testing.assert_close(probs[:, :, 0], weights[:, :, 0], atol=1e-6, rtol=1e-5)
        embedding = v.after_pool(v.pool_from_probs(tokens, probs))
        own = F.normalize(b.model.encode_image(x), dim=-1)  # CoCa's normalises by default
        torch.testing.assert_close(F.normalize(embedding, dim=-1), own, atol=1e-5, rtol=1e-5)
        dense = b.dense_tokens(x)  # [B, 1 + N, D], unit
        j = 3  # patch 3: token 4 of the stream
        only = torch.ones(len(x), tokens.shape[1], dtype=torch.bool)
        only[:, j + 1] = False
        out, _ = pool.attn(q, kx, kx, key_padding_mask=only)
        expected = F.normalize(visual.ln_post(out[:, 0]) @ visual.proj, dim=-1)
        torch.testing.assert_close(dense[:, 1 + j], expected, atol=1e-5, rtol=1e-5)


def test_methods_without_meaning_on_a_tower_say_which_apply(family_backends):
    b = family_backends("convnext")
    with pytest.raises(clipviz.ClipvizError, match="methods for it: itsm, gradcam") as e:
        clipviz.explain(b, _batch(b, 1), ["a dog"], "surgery")
    assert "timm ConvNeXt" in str(e.value)
    pe = family_backends("pe")
    with pytest.raises(clipviz.ClipvizError, match="gae is not defined"):
        clipviz.explain(pe, _batch(pe, 1), ["a dog"], "gae")


def test_post_norm_eva_blocks_are_recomputed_exactly():
    # EVA-02-E puts its norms after the attention and the MLP; a tiny one of its own
    from timm.models.eva import Eva

    from clipviz.backend import TimmViTTower

    torch.manual_seed(0)
    trunk = Eva(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                use_post_norm=True, num_classes=16).eval()  # fmt: skip
    visual = torch.nn.Module()
    visual.trunk, visual.head = trunk, torch.nn.Identity()
    vit = TimmViTTower(visual, lambda key, build: build(), "post-norm")
    assert vit.explicit_attention and "attention" in vit.capabilities
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = vit.embed(image)
        rope = trunk.rope.get_embed() if trunk.rope is not None else None
        for i, block in enumerate(trunk.blocks):
            stock = block(x) if rope is None else block(x, rope=rope)
            explicit, _ = vit.block_with_attention(i, x)
            torch.testing.assert_close(explicit, stock, atol=1e-5, rtol=1e-4)
            x = stock
        torch.testing.assert_close(vit.tokens(image)[:, 0], trunk(image), atol=1e-5, rtol=1e-4)


def test_a_tower_refused_for_an_interface_is_named_by_its_family(family_backends):
    b = family_backends("fastvit")  # a token stream, but no class token or probe reads it
    with pytest.raises(ClipvizError, match=r"'s image tower is timm FastVit, attention in the"):
        _ = b.readout_vit
    with pytest.raises(ClipvizError, match=r"this needs a ResNet image tower, .* timm ConvNeXt"):
        _ = family_backends("convnext").rn
