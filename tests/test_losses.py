"""The contrastive loss treats identical captions as shared positives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipviz.eclip.losses import contrastive_loss


def test_unique_captions_give_clip_loss():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    logits = 10.0 * img @ txt.T
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, 10.0, labels), expected)


def test_identical_captions_share_the_target():
    img = torch.eye(3)
    txt = torch.eye(3)
    ids = torch.tensor([0, 0, 1])  # samples 0 and 1 have the same caption
    loss = contrastive_loss(img, txt, 1.0, ids)
    e = math.e
    # row 0: logits (1, 0, 0), targets (1/2, 1/2, 0); row 2: logits (0, 0, 1), target 1
    row0 = -(0.5 * math.log(e / (e + 2)) + 0.5 * math.log(1 / (e + 2)))
    row1 = row0
    row2 = -math.log(e / (e + 2))
    assert math.isclose(loss.item(), (row0 + row1 + row2) / 3, rel_tol=1e-6)


def test_sigmoid_loss_is_siglips_pairwise_formula():
    from clipviz.eclip.losses import pair_loss, sigmoid_loss

    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 1, 2, 3])  # samples 1 and 2 share a caption
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if ids[i] == ids[j] else -1.0
            logit = 10.0 * float(img[i] @ txt[j]) - 5.0
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    expected = total / 5
    assert math.isclose(sigmoid_loss(img, txt, 10.0, -5.0, ids).item(), expected, rel_tol=1e-5)
    assert math.isclose(pair_loss(img, txt, 10.0, ids, -5.0).item(), expected, rel_tol=1e-5)
    # without a bias the model is a CLIP: InfoNCE
    assert pair_loss(img, txt, 10.0, ids).item() == contrastive_loss(img, txt, 10.0, ids).item()
