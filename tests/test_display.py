"""Maps in notebooks: overlays as PIL images, a figure per image, `clipviz.overlay`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

import clipviz
from clipviz.maps import place_in_box, upsample_normalized
from clipviz.render import blend_heatmap

PROMPTS = ["a dog", "a red square", "a very long prompt that would be cut at nineteen characters"]


def test_overlay_of_an_explanation_is_the_runs_overlay(vit_backend):
    images = [random_image(seed=1, size=(96, 80)), random_image(seed=2, size=(64, 64))]
    exp = clipviz.explain(vit_backend, images, PROMPTS, "itsm", ensemble=False)
    for i, image in enumerate(images):
        for t in range(len(PROMPTS)):
            got = np.asarray(exp.overlay(i, t))
            norm = place_in_box(exp.maps[i, t : t + 1], (0, 0, *image.size), image.size[::-1])
            expected = blend_heatmap(np.asarray(image), norm[0].numpy())
            np.testing.assert_array_equal(got, expected)
    assert np.array_equal(np.asarray(exp.overlay(0, "a red square")), np.asarray(exp.overlay(0, 1)))


def test_a_preprocessed_batch_is_shown_at_the_models_size(vit_backend):
    images = [random_image(seed=3, size=(64, 64))]
    x = torch.stack([vit_backend.preprocess(im) for im in images])
    exp = clipviz.explain(vit_backend, x, PROMPTS[:1], "itsm", ensemble=False)
    shown = np.asarray(exp.image(0)).astype(int)
    assert shown.shape == (64, 64, 3)
    assert np.abs(shown - np.asarray(images[0]).astype(int)).max() <= 1  # un-normalised back


def test_show_draws_the_image_and_every_prompt_with_full_labels(vit_backend):
    exp = clipviz.explain(vit_backend, [random_image(seed=4)], PROMPTS, "gradcam", ensemble=False)
    fig = exp.show()
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "image" and len(titles) == 1 + len(PROMPTS)
    assert "characters" in titles[-1].replace("\n", " ")  # wrapped, not cut
    assert "gradcam · p = " in titles[1]
    png = exp._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_level_overlay_normalises_and_upsamples_any_map():
    image = np.zeros((40, 60, 3), np.uint8)
    saliency = np.zeros((4, 6))
    saliency[1, 4] = 7.0  # one hot spot, raw scale
    out = np.asarray(clipviz.overlay(image, saliency, alpha=1.0))
    norm = upsample_normalized(torch.tensor(saliency, dtype=torch.float32)[None], (40, 60))[0]
    np.testing.assert_array_equal(out, blend_heatmap(image, norm.numpy(), alpha=1.0))
    y, x = np.unravel_index(norm.numpy().argmax(), norm.shape)
    assert out[y, x, 0] > 100 and out[y, x, 2] < 100  # jet's top is red
    floats = clipviz.overlay(np.ones((40, 60)) * 0.5, saliency)  # grey floats in [0, 1]
    assert isinstance(floats, Image.Image) and floats.size == (60, 40)


def test_a_hand_built_explanation_says_it_has_no_images():
    exp = clipviz.Explanation("itsm", ["a"], torch.zeros(1, 1, 2, 2), torch.zeros(1, 1),
                              torch.zeros(1, 1))  # fmt: skip
    with pytest.raises(clipviz.ClipvizError, match="no images to show"):
        exp.overlay(0, 0)
