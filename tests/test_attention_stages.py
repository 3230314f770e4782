"""Towers whose attention carries a relative position bias or lives in the last stage of a
hierarchical trunk — FastViT (MobileCLIP's MCi), Swin and timm's relative-position ViT —
checked against timm's own modules: the adapters' blocks recompute the stock forward, their
attention probabilities are the ones timm's unfused path computes, and Grad-CAM and MaskCLIP
equal step-by-step computations from timm's modules."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import random_image

from clipviz import ClipvizError
from clipviz.backend import load_backend
from clipviz.backend.base import tower_adapter
from clipviz.maps import normalize_maps
from clipviz.methods.cam import gradcam
from clipviz.methods.relevance import legrad
from clipviz.methods.surgery import maskclip

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["fastvit", "swin", "relpos"]
PROMPTS = ["a dog", "a red square"]


def _batch(b, n=2):
    return torch.stack([b.preprocess(random_image(seed=30 + i)) for i in range(n)])


def _last_blocks(trunk):
    """The blocks the adapter reads: the last stage's (FastViT, Swin) or all (relpos ViT)."""
    stages = getattr(trunk, "stages", None) or getattr(trunk, "layers", None)
    return list(stages[-1].blocks) if stages is not None else list(trunk.blocks)


def _perturbed(model):
    """A copy whose layer scales, relative position tables and BatchNorm statistics are far
    from their initial values (1e-5 scales, zero tables, unit statistics would hide mistakes)."""
    model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if name.endswith("gamma") or "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _perturbed_tower(b, family):
    """A perturbed copy of the family's model (see `_perturbed`) and its tower's adapter."""
    model = _perturbed(b.model)
    return model, tower_adapter(model.visual, lambda key, build: build(), family)


def _tower_of_trunk(trunk, name):
    """The adapter of a bare timm trunk as open_clip's `TimmModel` holds it (no projection)."""
    visual = type("Visual", (torch.nn.Module,), {})()
    visual.trunk, visual.head = trunk, torch.nn.Identity()
    return tower_adapter(visual, lambda key, build: build(), name)


def _relpos_variants():
    """timm relative-position ViTs: the MLP bias per block (the tiny family), a table bias
    shared by all blocks, and layer scale."""
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    common = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=0,
                  class_token=True, global_pool="token")  # fmt: skip
    return [
        VisionTransformerRelPos(**common, rel_pos_type="bias", shared_rel_pos=True),
        VisionTransformerRelPos(**common, rel_pos_dim=8, init_values=0.3),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_by_index_recompute_the_stock_forward(family_backends, family):
    b = family_backends(family)
    model, vit = _perturbed_tower(b, family)
    x = _batch(b)
    with torch.no_grad():
        h = vit.embed(x)
        for i in range(vit.depth):
            stock = vit.run_block(i, h)
            explicit, _ = vit.block_with_attention(i, h)
            q, k, v = vit.qkv(i, vit.norm1(i, h))
            y = h + vit.attn_out(i, vit.attend(i, q, k, v))
            torch.testing.assert_close(explicit, stock, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(y + vit.mlp(i, y), stock, atol=1e-5, rtol=1e-4)
            h = stock
        torch.testing.assert_close(vit.pooled(h), model.encode_image(x), atol=1e-5, rtol=1e-4)


def test_relative_position_variants_recompute_the_stock_forward():
    for trunk in _relpos_variants():
        trunk.eval()
        with torch.no_grad():
            for p in trunk.parameters():
                if p.dim() == 2 and p.shape[-1] == 2:  # the shared table: [positions, heads]
                    p.normal_(0, 1)
        vit = _tower_of_trunk(trunk, "relpos")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            h = vit.embed(x)
            for i in range(vit.depth):
                explicit, _ = vit.block_with_attention(i, h)
                h = vit.run_block(i, h)
                torch.testing.assert_close(explicit, h, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(vit.pooled(h), trunk(x), atol=1e-5, rtol=1e-4)
            assert vit.attention_bias(0) is not None and vit.attention_bias(0).abs().sum() > 0


def _unfused_softmax(block):
    """The module whose output (or input) holds a block's attention probabilities once its
    attention runs unfused: Swin's softmax, else the dropout after the softmax."""
    attn = getattr(block, "attn", None) or block.token_mixer
    attn.fused_attn = False
    return getattr(attn, "softmax", None) or attn.attn_drop


def _timm_probs(model, x):
    """Attention probabilities of the blocks the adapter reads, from timm's unfused path
    (captured at its softmax or at the dropout after it), one forward of the stock model."""
    model = copy.deepcopy(model)
    store = []
    for block in _last_blocks(model.visual.trunk):
        _unfused_softmax(block).register_forward_hook(lambda m, i, o: store.append(o.detach()))
    with torch.no_grad():
        model.encode_image(x)
    return store


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_probabilities_are_timms_own(family_backends, family):
    b = family_backends(family)
    model, vit = _perturbed_tower(b, family)
    x = _batch(b)
    expected = _timm_probs(model, x)
    with torch.no_grad():
        h = vit.embed(x)
        for i in range(vit.depth):
            h, probs = vit.block_with_attention(i, h)
            torch.testing.assert_close(probs, expected[i], atol=1e-6, rtol=1e-4)


def _norm_before_last_attention(trunk):
    block = _last_blocks(trunk)[-1]
    return getattr(block, "norm1", None) or block.norm


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcam_reads_the_last_attention_blocks_norm(family_backends, family):
    """The ViT recipe (pytorch-grad-cam's for Swin: `layers[-1].blocks[-1].norm1`): the norm's
    output, the gradient of the stock forward's cosine through hooks, channels weighted by the
    mean gradient."""
    b = family_backends(family)
    x, texts = _batch(b), b.encode_texts(PROMPTS, ensemble=False)
    result = gradcam(b, x, texts)
    h, w = b.grid_size(x)
    store = {}

    def leaf(module, inputs, output):
        store["A"] = output.detach().requires_grad_(True)
        return store["A"]

    handle = _norm_before_last_attention(b.model.visual.trunk).register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            emb = F.normalize(b.model.encode_image(x), dim=-1)
    finally:
        handle.remove()
    A = store["A"]
    grid = {  # -> [B, C, h, w]
        "fastvit": lambda t: t,
        "swin": lambda t: t.permute(0, 3, 1, 2),
        "relpos": lambda t: t[:, 1:].transpose(1, 2).reshape(len(x), -1, h, w),
    }[family]
    for j, text in enumerate(texts.embeddings):
        (g,) = torch.autograd.grad((emb @ text).sum(), A, retain_graph=True)
        alpha = grid(g).mean(dim=(2, 3), keepdim=True)
        expected = (alpha * grid(A.detach())).sum(dim=1).relu()
        torch.testing.assert_close(result.maps[:, j], expected, atol=1e-6, rtol=1e-4)


def test_maskclip_on_swin_is_the_value_path_of_its_last_block(family_backends):
    """By hand from timm's modules: the last block's input (a hook), `x + proj(v)` with v from
    `norm1(x)`, the MLP branch, the final norm, the projection at every location, cosine."""
    b = family_backends("swin")
    x, texts = _batch(b), b.encode_texts(PROMPTS, ensemble=False)
    trunk = b.model.visual.trunk
    last = _last_blocks(trunk)[-1]
    store = {}
    handle = last.register_forward_pre_hook(lambda m, args: store.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            b.model.encode_image(x)
    finally:
        handle.remove()
    with torch.no_grad():
        inp = store["x"]  # [B, h, w, C]
        C = inp.shape[-1]
        v = F.linear(last.norm1(inp), last.attn.qkv.weight, last.attn.qkv.bias)[..., 2 * C :]
        y = inp + last.attn.proj(v)
        y = y + last.mlp(last.norm2(y))
        tokens = F.normalize(b.model.visual.head(trunk.norm(y)).flatten(1, 2), dim=-1)
    expected = (tokens @ texts.embeddings.T).transpose(1, 2).reshape(len(x), 2, *b.grid_size(x))
    torch.testing.assert_close(maskclip(b, x, texts).maps, expected, atol=1e-5, rtol=1e-4)


def test_fastvit_runs_at_another_resolution_and_the_relpos_vit_says_it_cannot(tiny_weights):
    config, weights = tiny_weights["fastvit"]
    b = load_backend(model_config=config, pretrained=str(weights), device="cpu", resolution=128)
    x = torch.stack([b.preprocess(random_image(seed=1))])
    with torch.no_grad():
        tokens = b.dense_tokens(x)
    assert tokens.shape[1] == 1 + 16  # a 4x4 grid at stride 32
    torch.testing.assert_close(tokens[:, 0], F.normalize(b.model.encode_image(x), dim=-1))
    config, weights = tiny_weights["relpos"]
    with pytest.raises(ClipvizError, match="relative position bias is built for a 4x4 grid"):
        load_backend(model_config=config, pretrained=str(weights), device="cpu", resolution=128)


def test_a_swin_whose_last_stage_has_several_windows_is_read_as_a_feature_map():
    """At 128 px the tiny Swin's last stage is 4x4 patches in 2x2 windows: not one global
    attention, so the adapter is the pooled-feature-map one (no attention methods)."""
    trunk = timm.create_model("clipviz_tiny_swin", img_size=128, num_classes=0)
    adapter = _tower_of_trunk(trunk, "swin-128")
    assert adapter.kind == "conv" and "attention" not in adapter.capabilities


@pytest.mark.parametrize("family", ["fastvit", "swin"])
def test_legrad_on_a_last_stage_is_the_gradient_at_timms_own_attention(family_backends, family):
    """`compute_legrad_clip` with the stock rest of the tower as each block's readout: for each
    of the last 2 blocks, timm's own forward with that block's attention probabilities made a
    leaf (unfused, hooked), the block's output read by the final layers and the head, cosine
    with the text, `ReLU(∂s/∂A)` averaged over heads and queries, summed, min-maxed."""
    b = family_backends(family)
    x, texts = _batch(b), b.encode_texts(PROMPTS, ensemble=False)
    result = legrad(b, x, texts)
    model = copy.deepcopy(b.model)
    visual, trunk = model.visual, model.visual.trunk
    blocks = _last_blocks(trunk)
    final = trunk.norm if family == "swin" else trunk.final_conv
    total = 0
    for block in blocks[-2:]:
        store = {}

        def leaf(module, inputs, output, store=store):
            store["A"] = output.detach().requires_grad_(True)
            return store["A"]

        handles = [
            _unfused_softmax(block).register_forward_hook(leaf),
            block.register_forward_hook(lambda m, i, o, store=store: store.setdefault("x", o)),
        ]
        try:
            with torch.enable_grad():
                model.encode_image(x)
                emb = F.normalize(visual.head(trunk.forward_head(final(store["x"]))), dim=-1)
                sims = emb @ texts.embeddings.T  # [B, T]
                g = torch.stack([torch.autograd.grad(sims[:, t].sum(), store["A"],
                                                     retain_graph=True)[0] for t in range(2)])  # fmt: skip
        finally:
            for h in handles:
                h.remove()
        total = total + g.clamp(min=0).mean(dim=(2, 3))  # [T, B, N]
    h, w = b.grid_size(x)
    expected = normalize_maps(total.transpose(0, 1).reshape(len(x), 2, h, w))
    torch.testing.assert_close(result.maps, expected, atol=1e-5, rtol=1e-4)


def test_last_stage_tokens_of_another_embed_are_refused(family_backends):
    b = family_backends("fastvit")
    vit = b.vision
    with torch.no_grad():
        width = vit.embed(torch.randn(1, 3, 64, 64)).shape[-1]  # a 2x2 grid
        with pytest.raises(ClipvizError, match="16 tokens were not made by the last `embed`"):
            vit.pooled(torch.randn(1, 16, width))


def test_swin_attention_under_bf16_autocast_is_timms_own(family_backends):
    b = family_backends("swin")
    model, vit = _perturbed_tower(b, "swin")
    x = _batch(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _timm_probs(model, x)
        with torch.no_grad():
            h = vit.embed(x)
            for i in range(vit.depth):
                h, probs = vit.block_with_attention(i, h)
                assert probs.dtype == expected[i].dtype == torch.float32
                torch.testing.assert_close(probs, expected[i], atol=2e-3, rtol=0)
