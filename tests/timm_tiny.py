"""Tiny timm towers of families whose registered variants are large: a Swin whose last stage
is one window over the whole map, a relative-position ViT with a class token, and a ViT with
register tokens. Registered with timm under their own names, so the open_clip configs in
`configs/` build them the way a user's config builds a registered model."""

from __future__ import annotations

from typing import Any

from timm.models import register_model

# what timm's factory hands every model function besides the model's own arguments
_FACTORY = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _own(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _FACTORY}


def _built(model: Any) -> Any:
    """The model with the (empty) pretrained config timm's builder would have set."""
    model.pretrained_cfg = model.default_cfg = {}
    return model


@register_model
def clipviz_tiny_swin(**kwargs: Any) -> Any:
    """Swin at 64 px: stages of 16, 8, 4 and 2 patches a side, windows of 2 (shifted in the
    stages with several windows), so the last stage's one window is the whole map."""
    from timm.models.swin_transformer import SwinTransformer

    args = dict(img_size=64, patch_size=4, window_size=2, embed_dim=16, depths=(1, 2, 1, 2),
                num_heads=(1, 2, 2, 4), drop_path_rate=0.0)  # fmt: skip
    return _built(SwinTransformer(**{**args, **_own(kwargs)}))


@register_model
def clipviz_tiny_relpos(**kwargs: Any) -> Any:
    """timm's relative-position ViT at 64 px (a 4x4 grid), class token, MLP position bias."""
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    args = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, qkv_bias=False,
                class_token=True, global_pool="token", rel_pos_dim=16, init_values=None)  # fmt: skip
    return _built(VisionTransformerRelPos(**{**args, **_own(kwargs)}))


@register_model
def clipviz_tiny_vit_reg4(**kwargs: Any) -> Any:
    """timm's ViT with a class token and 4 register tokens at 64 px (a 4x4 grid), positions on
    the patches alone and layer scale, as `vit_*_reg4_dinov2`."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, reg_tokens=4,
                no_embed_class=True, init_values=1e-5, global_pool="token")  # fmt: skip
    return _built(VisionTransformer(**{**args, **_own(kwargs)}))
