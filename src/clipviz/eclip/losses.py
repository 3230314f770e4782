"""The contrastive loss shared by CLIP pretraining of the test bed and ECLIP finetuning."""

from __future__ import annotations

import torch


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    caption_ids: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with an identical caption is a positive.

    image_emb, text_emb: unit-length `[B, D]`, row i of each from sample i.
    caption_ids: `[B]` integers, equal for identical captions; targets are spread evenly
        over all positives of a row (one-hot when captions are unique, as in CLIP).
    """
    logits = logit_scale * image_emb @ text_emb.T  # [B, B]
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric relation: rows = columns
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2
