"""The losses shared by the test bed's pretraining and ECLIP finetuning: CLIP's contrastive
InfoNCE and SigLIP's pairwise sigmoid loss."""

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


def sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    caption_ids: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, `−(1/B) Σ_ij log σ(z_ij (scale · x_i·y_j + bias))`
    with `z_ij = 1` for pairs with identical captions and −1 otherwise (Zhai et al. 2023).

    image_emb, text_emb: unit-length `[B, D]`, row i of each from sample i.
    """
    logits = logit_scale * image_emb @ text_emb.T + logit_bias  # [B, B]
    labels = 2.0 * (caption_ids[:, None] == caption_ids[None, :]).float() - 1.0
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / image_emb.shape[0]


def pair_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    caption_ids: torch.Tensor,
    logit_bias: float | None = None,
) -> torch.Tensor:
    """The loss the model was trained with: sigmoid when it has a logit bias (SigLIP),
    otherwise CLIP's symmetric InfoNCE."""
    if logit_bias is not None:
        return sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias, caption_ids)
    return contrastive_loss(image_emb, text_emb, logit_scale, caption_ids)
