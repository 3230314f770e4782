"""ECLIP's model part: free attention, the mask rule, masked max pooling, the explain head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipviz import ClipvizError
from clipviz.eclip.head import (
    ExplainHead,
    free_attention_mask,
    frozen_features,
    masked_max_pool,
)


def test_mask_follows_the_attention():
    attention = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1]])
    mean = free_attention_mask(attention, "mean")  # means are 0.25 in both rows
    assert mean.tolist() == [[False, True, True, False], [True, False, False, False]]
    top = free_attention_mask(attention, "topk", 0.5)
    assert top.tolist() == [[False, True, True, False], [True, True, True, True]]  # ties kept
    fixed = free_attention_mask(attention, "threshold", 0.6)
    assert fixed.tolist() == [[False, True, False, False], [True, False, False, False]]
    with pytest.raises(ClipvizError, match="topk needs a share"):
        free_attention_mask(attention, "topk")


def test_max_is_taken_only_inside_the_mask():
    features = torch.tensor([[[1.0, 0.0], [0.0, 5.0], [3.0, 1.0]]])  # [1, 3, 2]
    mask = torch.tensor([[True, False, True]])
    pooled = masked_max_pool(features, mask)
    torch.testing.assert_close(pooled, F.normalize(torch.tensor([[3.0, 1.0]]), dim=-1))
    everything = masked_max_pool(features, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(everything, F.normalize(torch.tensor([[3.0, 5.0]]), dim=-1))


def test_free_attention_is_the_class_token_row_of_the_last_block(vit_backend):
    b = vit_backend
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = frozen_features(b, x)
    with torch.no_grad():
        *first, last = b.model.visual.transformer.resblocks
        h = b.vit.embed(x)
        for block in first:
            h = block(h)
        _, weights = last.attn(*(last.ln_1(h),) * 3, need_weights=True)  # head-averaged
    torch.testing.assert_close(feats.free_attention, weights[:, 0, 1:])
    torch.testing.assert_close(
        feats.stock_embedding, F.normalize(b.model.encode_image(x), dim=-1), atol=1e-5, rtol=1e-5
    )


def test_fresh_explain_head_reproduces_stock_itsm_tokens_on_vit(vit_backend):
    b = vit_backend
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    head = ExplainHead(b)
    assert list(head.state_dict()) == ["proj"]
    assert all(p.requires_grad for p in head.parameters())
    e = head.features(frozen_features(b, x).tokens)
    torch.testing.assert_close(e, b.dense_tokens(x)[:, 1:], atol=1e-5, rtol=1e-5)
    assert head.proj.data_ptr() != b.model.visual.proj.data_ptr()  # a copy, stock kept


def test_rn_explain_head_uses_the_value_path(rn_backend):
    b = rn_backend
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    head = ExplainHead(b)
    assert sorted(head.state_dict()) == ["bias", "proj"]
    feats = frozen_features(b, x)
    pool = b.model.visual.attnpool
    with torch.no_grad():
        expected = F.normalize(pool.c_proj(pool.v_proj(feats.tokens[:, 1:])), dim=-1)
    torch.testing.assert_close(head.features(feats.tokens), expected, atol=1e-5, rtol=1e-5)
    assert feats.free_attention.shape == (1, 4)
    assert torch.all(feats.free_attention > 0)
