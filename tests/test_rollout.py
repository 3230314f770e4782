"""Attention rollout against the reference's `compute_joint_attention`, written out here in
float64 numpy on the head-averaged attention that `nn.MultiheadAttention` itself returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

from clipviz import ClipvizError
from clipviz.methods.rollout import rollout


def _joint_attention(att_mat, add_residual=True):
    """The reference: `att_mat` [layers, L, L] -> the rollout after every layer."""
    if add_residual:
        aug = att_mat + np.eye(att_mat.shape[1])[None]
        aug = aug / aug.sum(axis=-1)[..., None]
    else:
        aug = att_mat
    joint = np.zeros(aug.shape)
    joint[0] = aug[0]
    for i in range(1, len(aug)):
        joint[i] = aug[i].dot(joint[i - 1])
    return joint


def _attention_per_block(backend, image):
    """Head-averaged attention `[layers, L, L]` of the stock blocks for one image."""
    v = backend.model.visual
    with torch.no_grad():
        x = v.ln_pre(v._embeds(image[None]))
        mats = []
        for block in v.transformer.resblocks:
            h = block.ln_1(x)
            _, weights = block.attn(h, h, h, need_weights=True)  # averaged over heads
            mats.append(weights[0].double().numpy())
            x = block(x)
    return np.stack(mats)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("start_layer", [0, -1])
def test_rollout_equals_the_reference_joint_attention(vit_backend, residual, start_layer):
    b = vit_backend
    images = torch.stack([b.preprocess(random_image(seed=i)) for i in range(2)])
    result = rollout(b, images, b.encode_texts(["a dog", "a cat"]), start_layer, residual)
    assert result.maps.shape == (2, 2, 4, 4)
    for i, image in enumerate(images):
        att = _attention_per_block(b, image)[start_layer % 2 :]
        expected = _joint_attention(att, residual)[-1][0, 1:].reshape(4, 4)
        for t in range(2):  # text-agnostic: the same map for every prompt
            np.testing.assert_allclose(result.maps[i, t].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_rollout_needs_a_vit_and_a_block_in_range(vit_backend, rn_backend):
    image = vit_backend.preprocess(random_image(0))[None]
    with pytest.raises(ClipvizError, match="start_layer=2 is out of range"):
        rollout(vit_backend, image, vit_backend.encode_texts(["a dog"]), start_layer=2)
    with pytest.raises(ClipvizError, match="needs a ViT"):
        rollout(rn_backend, image, rn_backend.encode_texts(["a dog"]))
