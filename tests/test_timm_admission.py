"""timm modules are recomputed only where clipviz reproduces them, by exact type: another
attention (timm's DiffAttention, a subclass with its own forward) keeps the tower's stock
forward and refuses the methods that would recompute it, naming the module; an attention-pool
probe the head does not reproduce refuses the tower; the probe's pooling is the one timm's
forward applies."""

from __future__ import annotations

import pytest
import timm_tiny
import torch
from timm.layers import Attention, AttentionPoolLatent, AttentionPoolPrr, DiffAttention
from timm.models.vision_transformer import Block, VisionTransformer

from clipviz import ClipvizError
from clipviz.backend import TimmConvTower, TimmViTTower
from clipviz.backend.base import tower_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 32


def _memo(key, build):
    return build()


def _visual(trunk):
    visual = torch.nn.Module()
    visual.trunk, visual.head = trunk.eval(), torch.nn.Identity()
    return visual


def _vit(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=16, embed_dim=WIDTH, depth=2, num_heads=2,
                num_classes=16)  # fmt: skip
    return VisionTransformer(**{**args, **kwargs})


class _ScaledAttention(Attention):
    """timm's Attention with a forward of its own."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 2 * super().forward(x, attn_mask, is_causal)


class _ScaledBlock(Block):
    """timm's Block with a forward of its own."""

    def forward(self, x, attn_mask=None):
        return 2 * super().forward(x, attn_mask)


@pytest.mark.parametrize(
    ("kwargs", "module"),
    [
        ({"attn_layer": DiffAttention}, "DiffAttention"),
        ({"attn_layer": _ScaledAttention}, "_ScaledAttention"),
        ({"block_fn": _ScaledBlock}, "_ScaledBlock"),
    ],
)
def test_attention_clipviz_does_not_reproduce_is_refused_naming_the_module(kwargs, module):
    trunk = _vit(**kwargs)
    vit = TimmViTTower(_visual(trunk), _memo, "tiny")
    assert not {"attention", "eclip"} & vit.capabilities
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.tokens(image)[:, 0], trunk(image))  # the stock forward
        x = vit.embed(image)
        with pytest.raises(ClipvizError, match=module) as refused:
            vit.block_with_attention(0, x)
    assert "\n" not in str(refused.value)


def _map_vit(probe):
    trunk = _vit(global_pool="map", class_token=False)
    trunk.attn_pool = probe
    return trunk


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_a_probe_with_several_latents_pools_as_timms_forward(pool):
    torch.manual_seed(1)
    probe = AttentionPoolLatent(WIDTH, num_heads=2, mlp_ratio=2.0, latent_len=2,
                                pool_type=pool, norm_layer=torch.nn.LayerNorm)  # fmt: skip
    trunk = _map_vit(probe)
    vit = TimmViTTower(_visual(trunk), _memo, "tiny")
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.pool_input(vit.run_blocks(vit.embed(image)))
        probs = vit.latent_probs(tokens)
        torch.testing.assert_close(vit.pool_from_probs(tokens, probs), probe(tokens))
        torch.testing.assert_close(vit.tokens(image)[:, 0], trunk(image))
    # the latents whose attention the pooled output reads: the first, or every one
    assert probs.shape[2] == {"token": 1, "avg": 2}[pool]


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (lambda: AttentionPoolLatent(WIDTH, num_heads=2, pos_embed="abs", feat_size=4),
         "position embeddings"),
        (lambda: AttentionPoolLatent(WIDTH, num_heads=2, latent_len=2, pool_type=""),
         "pooling ''"),
        (lambda: AttentionPoolPrr(WIDTH, num_heads=2), "AttentionPoolPrr"),
    ],
)  # fmt: skip
def test_a_probe_the_head_does_not_reproduce_refuses_the_tower(probe, message):
    with pytest.raises(ClipvizError, match=message) as refused:
        TimmViTTower(_visual(_map_vit(probe())), _memo, "tiny")
    assert str(refused.value).startswith("tiny: ") and "\n" not in str(refused.value)


def test_a_swin_stage_with_another_attention_is_read_as_a_feature_map():
    trunk = timm_tiny.clipviz_tiny_swin()
    assert "attention" in tower_adapter(_visual(trunk), _memo, "swin").capabilities
    attn = trunk.layers[-1].blocks[0].attn
    attn.__class__ = type("OtherWindowAttention", (type(attn),), {})
    adapter = tower_adapter(_visual(trunk), _memo, "swin")
    assert isinstance(adapter, TimmConvTower) and "attention" not in adapter.capabilities


def test_a_trunk_subclass_is_refused_even_under_timms_name():
    own = type("VisionTransformer", (VisionTransformer,), {"forward": lambda self, x: x})
    torch.manual_seed(0)
    trunk = own(img_size=32, patch_size=16, embed_dim=WIDTH, depth=1, num_heads=2)
    with pytest.raises(ClipvizError, match="timm VisionTransformer is not supported"):
        tower_adapter(_visual(trunk), _memo, "tiny")
