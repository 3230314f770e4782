"""The segmentation protocol end to end on the tiny ViT, against a slow reference written the
way the authors' segmentors run: one image, one window at a time."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from clipviz.errors import ClipvizError
from clipviz.methods import get_method
from clipviz.segment import Protocol, Segmenter, parse_classes, segment
from clipviz.segment.segmenter import imagenet_templates

CLASSES = parse_classes("background, sky; wall\nred square\ncat, kitten\nnoise\n")


def reference_embeddings(backend, names):
    """Per name: the 80 templates, each embedding normalised, the mean normalised."""
    rows = []
    for name in names:
        sentences = [t(name) for t in OPENAI_IMAGENET_TEMPLATES]
        rows.append(F.normalize(torch.stack(backend.embed_texts(sentences, False)).mean(0), dim=0))
    return torch.stack(rows)


def reference_pamr(image, mask, steps, dilations):
    """PAMR as 3x3 dilated convolutions with shift kernels (the original formulation)."""

    def kernel(with_centre, sign):
        rows = []
        for i in range(3):
            for j in range(3):
                if (i, j) == (1, 1) and not with_centre:
                    continue
                k = torch.zeros(3, 3)
                k[i, j] = 1
                if sign:
                    k = -k
                    k[1, 1] += 1
                rows.append(k)
        return torch.stack(rows)[:, None]

    def local(x, k):
        B, C, H, W = x.shape
        x = x.reshape(B * C, 1, H, W)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), k, dilation=d) for d in dilations]
        return torch.cat(outs, 1).reshape(B, C, -1, H, W)

    std = local(image, kernel(True, False)).std(2, keepdim=True)
    aff = (-local(image, kernel(False, True)).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True)
    aff = aff.softmax(2)
    for _ in range(steps):
        mask = (local(mask, kernel(False, False)) * aff).sum(2)
    return mask


def reference_segment(backend, method, image, queries, name_class, p: Protocol, whole="naclip"):
    """One image as the reference segmentors compute it; returns (labels, probabilities)."""
    H0, W0 = image.shape[:2]
    s = min(2048 / max(H0, W0), p.short_side / min(H0, W0))
    size = (int(W0 * s + 0.5), int(H0 * s + 0.5))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mean = torch.tensor(backend.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(backend.preprocess.std).view(1, 3, 1, 1) * 255
    img = (torch.from_numpy(resized).permute(2, 0, 1)[None].float() - mean) / std
    patch = 16

    def forward_feature(crop, logit_size):
        gh, gw = crop.shape[-2] // patch, crop.shape[-1] // patch
        maps = method.fn(backend, crop[..., : gh * patch, : gw * patch], queries).maps
        return F.interpolate(maps, size=logit_size, mode="bilinear", align_corners=False)

    H, W = img.shape[-2:]
    if p.window == 0:
        if whole == "naclip":  # the patch map to the resized size, then to the original
            logits = forward_feature(img, (H, W))
            logits = F.interpolate(logits, (H0, W0), mode="bilinear", align_corners=False)
        else:  # SCLIP: from the patch grid to the original size directly
            logits = forward_feature(img, (H0, W0))
    else:
        crop, stride = p.window, p.stride
        preds = torch.zeros(1, len(queries.prompts), H, W)
        count = torch.zeros(1, 1, H, W)
        for hi in range(max(H - crop + stride - 1, 0) // stride + 1):
            for wi in range(max(W - crop + stride - 1, 0) // stride + 1):
                y1, x1 = hi * stride, wi * stride
                y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                window = img[:, :, y1:y2, x1:x2]
                out = forward_feature(window, window.shape[-2:])
                preds += F.pad(out, (x1, W - x2, y1, H - y2))
                count[:, :, y1:y2, x1:x2] += 1
        logits = F.interpolate(preds / count, (H0, W0), mode="bilinear", align_corners=False)
    if p.pamr_steps:
        guide = F.interpolate(img, (H0, W0), mode="bilinear", align_corners=False)
        logits = reference_pamr(guide, logits, p.pamr_steps, p.pamr_dilations)
    probs = (logits[0] * p.logit_scale).softmax(0)
    K = int(name_class.max()) + 1
    one_hot = F.one_hot(name_class).T.view(K, len(name_class), 1, 1)
    probs = (probs[None] * one_hot).max(1)[0]
    if p.area_thd:
        area = F.one_hot(probs.argmax(0), K)[:, :, 1:].sum((0, 1))
        probs[1:] *= (area > p.area_thd * area.sum()).float().view(-1, 1, 1)
    labels = probs.argmax(0)
    labels[probs.max(0)[0] < p.prob_thd] = 0
    return labels, probs


def images():
    first = np.asarray(random_image(0, (130, 97)))
    second = np.asarray(random_image(1, (60, 83)))  # smaller than the window once resized
    return [first, second]


def check_equal(ours, labels, probs, labels_only=None):
    """`ours` (with probabilities) equals the reference; so do the labels of `labels_only` (a
    run that asked for labels alone, decided on the grid), ties aside."""
    assert torch.allclose(ours.probs, probs, atol=1e-5)
    top2 = probs.topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-4).numpy()  # ties aside
    assert clear.mean() > 0.95
    assert np.array_equal(ours.labels[clear], labels[clear].numpy())
    if labels_only is not None:
        assert labels_only.probs is None
        assert np.array_equal(labels_only.labels[clear], labels[clear].numpy())


def test_templates_are_the_80_openai_imagenet_ones():
    templates = imagenet_templates()
    assert templates == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] and len(templates) == 80


@pytest.mark.parametrize(
    ("method", "protocol"),
    [
        ("sclip", Protocol(short_side=96, window=64, stride=32, logit_scale=40.0,
                           prob_thd=0.3, area_thd=0.1)),
        ("naclip", Protocol(short_side=80, window=64, stride=48, pamr_steps=3,
                            pamr_dilations=(1, 2))),
        ("naclip", Protocol(short_side=72, window=0, stride=0, pamr_steps=2,
                            pamr_dilations=(2,), prob_thd=0.2)),
    ],
)  # fmt: skip
def test_labels_equal_a_window_by_window_reference(vit_backend, one_thread, method, protocol):
    segmenter = Segmenter(vit_backend, CLASSES, method, protocol, window_batch=3)
    queries = segmenter.texts
    assert torch.allclose(queries.embeddings, reference_embeddings(vit_backend, CLASSES.names),
                          atol=1e-6)  # fmt: skip
    name_class = torch.tensor(CLASSES.name_class)
    results = segmenter(images(), keep_probs=True)
    for image, ours, alone in zip(images(), results, segmenter(images()), strict=True):
        assert ours.error is None and ours.labels.shape == image.shape[:2]
        labels, probs = reference_segment(
            vit_backend, get_method(method), image, queries, name_class, protocol
        )
        check_equal(ours, labels, probs, alone)
        assert len(np.unique(ours.labels)) > 1  # not a flat answer


def test_whole_image_follows_naclips_order(vit_backend, one_thread):
    # 72 x 96 resized: 72 is not a multiple of the patch, so the order of the upsamplings matters
    protocol = Protocol(short_side=72, window=0, stride=0)
    ours = segment(vit_backend, images()[:1], CLASSES, "naclip", protocol, keep_probs=True)[0]
    assert ours.resized == (72, 96) and ours.windows == 1
    args = (
        vit_backend,
        get_method("naclip"),
        images()[0],
        Segmenter(vit_backend, CLASSES, "naclip", protocol).texts,
        torch.tensor(CLASSES.name_class),
        protocol,
    )
    _, naclip_probs = reference_segment(*args, whole="naclip")
    _, sclip_probs = reference_segment(*args, whole="sclip")
    assert torch.allclose(ours.probs, naclip_probs, atol=1e-5)
    assert not torch.allclose(ours.probs, sclip_probs, atol=1e-3)


def test_a_batch_gives_what_each_image_gives_alone(vit_backend, one_thread):
    protocol = Protocol(short_side=96, window=64, stride=32)
    segmenter = Segmenter(vit_backend, CLASSES, "sclip", protocol)
    together = segmenter(images(), keep_probs=True)
    for image, both in zip(images(), together, strict=True):
        alone = segmenter([image], keep_probs=True)[0]
        assert torch.allclose(both.probs, alone.probs, atol=1e-6)
        assert both.windows == alone.windows


def test_non_finite_scores_fail_that_image_only(vit_backend, one_thread, monkeypatch):
    segmenter = Segmenter(
        vit_backend, CLASSES, "itsm", Protocol(short_side=64, window=64, stride=64)
    )
    fn = segmenter.method.fn
    calls = []

    def poisoned(backend, crops, texts):
        result = fn(backend, crops, texts)
        calls.append(len(crops))
        result.maps[0, 0, 0, 0] = float("nan")  # the first window of the batch: image 0's
        return result

    monkeypatch.setattr(segmenter, "method", type(segmenter.method)(segmenter.method.info,
                                                                    poisoned))  # fmt: skip
    first, second = segmenter(images())
    assert first.labels is None and "not finite" in first.error
    assert second.error is None and second.labels is not None
    assert calls == [4]  # the two windows of each image in one forward pass


def test_a_window_smaller_than_a_patch_fails_that_image_only(vit_backend, one_thread):
    thin = np.zeros((200, 10, 3), dtype=np.uint8)  # 10 px wide: less than a 16-px patch
    results = segment(vit_backend, [thin, images()[0]], CLASSES, "itsm",
                      Protocol(short_side=0, window=64, stride=32))  # fmt: skip
    assert results[0].labels is None and "smaller than one 16x16 patch" in results[0].error
    assert results[1].labels is not None


def test_bad_method_or_options_are_usage_errors(vit_backend):
    with pytest.raises(ClipvizError, match="unknown method"):
        Segmenter(vit_backend, CLASSES, "nosuch")
    with pytest.raises(ClipvizError, match="no option"):
        Segmenter(vit_backend, CLASSES, "naclip", options={"sigma": 2})
    with pytest.raises(ClipvizError, match="stride"):
        Segmenter(vit_backend, CLASSES, "sclip", Protocol(window=64, stride=0))
