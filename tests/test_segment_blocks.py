"""The protocol's classification runs on blocks of pixels: the same labels and probabilities
as the whole-image computation, bit for bit, without ever holding every name's scores at every
pixel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from clipviz.segment import Protocol
from clipviz.segment import protocol as steps
from clipviz.segment.windows import Window


def whole_image_classify(
    cos: torch.Tensor, name_class: torch.Tensor, num_classes: int, protocol: Protocol
) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol written out over the whole image at once: softmax over every name, each
    class's best name, the area threshold on argmax counts, the argmax, prob_thd."""
    probs = (cos * protocol.logit_scale).softmax(dim=0)
    by_class = torch.stack(
        [probs[name_class == k].amax(dim=0) for k in range(num_classes)]
    )  # [K, H, W]
    counts = torch.bincount(by_class.argmax(dim=0).flatten(), minlength=num_classes)[1:]
    for k in range(1, num_classes):
        if counts[k - 1] <= protocol.area_thd * counts.sum():
            by_class[k] = 0.0
    best, labels = by_class.max(dim=0)
    return labels.masked_fill(best < protocol.prob_thd, 0), by_class


def cosines_with_a_small_class(names: int, h: int, w: int) -> torch.Tensor:
    """Cosines `[names, h, w]` in which name 3 (class 2 below) wins on a few pixels only."""
    g = torch.Generator().manual_seed(0)
    cos = torch.rand((names, h, w), generator=g) * 0.1 + 0.2
    cos[3] -= 0.05
    cos[3, :2, :3] += 0.3
    return cos


@pytest.mark.parametrize("order", ["lines", "shuffled"])
def test_classifying_in_blocks_gives_the_whole_image_result_bit_for_bit(
    monkeypatch, one_thread, order
):
    # on one thread: on several, where the softmax's vectorised loop splits between threads
    # moves which pixels its scalar tail computes, which may differ in the last bit
    monkeypatch.setattr(steps, "CLASSIFY_BLOCK", 96)  # 37 x 53 pixels: 20 blocks, the last short
    name_class = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])
    if order == "shuffled":
        name_class = name_class[torch.tensor([5, 0, 3, 7, 1, 6, 2, 4])]
    cos = cosines_with_a_small_class(len(name_class), 37, 53)
    protocol = Protocol(logit_scale=60.0, prob_thd=0.3, area_thd=0.05)
    labels, probs = steps.classify(cos, name_class, 5, protocol)
    expected_labels, expected_probs = whole_image_classify(cos, name_class, 5, protocol)
    assert torch.equal(probs, expected_probs) and torch.equal(labels, expected_labels)
    small = int(name_class[3])  # the class of the name that wins on 6 pixels: dropped
    assert not (labels == small).any() and (labels == 0).any() and len(labels.unique()) > 2


class LargestTensor(TorchFunctionMode):
    """Records the most elements of any tensor an operation returns (views of `given` left
    out: they hold no memory of their own)."""

    def __init__(self, given: torch.Tensor) -> None:
        super().__init__()
        self.numel, self.given = 0, given.untyped_storage().data_ptr()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.given:
                self.numel = max(self.numel, t.numel())
        return out


def test_classifying_never_holds_every_names_scores_at_every_pixel(monkeypatch):
    monkeypatch.setattr(steps, "CLASSIFY_BLOCK", 256)
    names, classes, h, w = 40, 4, 64, 64
    name_class = torch.arange(names) * classes // names  # 10 synonyms per class
    cos = cosines_with_a_small_class(names, h, w)
    with LargestTensor(cos) as seen:
        labels, probs = steps.classify(cos, name_class, classes, Protocol(area_thd=0.1))
    # the outputs are the largest: [K, H, W] probabilities; a [Q, H, W] softmax never exists
    assert seen.numel == probs.numel() == classes * h * w < names * h * w
    assert torch.equal(
        labels, whole_image_classify(cos, name_class, classes, Protocol(area_thd=0.1))[0]
    )


def test_merging_windows_resized_together_equals_one_by_one():
    g = torch.Generator().manual_seed(1)
    windows = [Window(0, 0, 32, 32), Window(0, 16, 32, 48), Window(16, 0, 40, 24),
               Window(16, 24, 40, 48)]  # fmt: skip
    grids = [(4, 4), (4, 4), (3, 3), (3, 3)]  # two sizes of window, two grids
    # as methods return them: [T, h, w] views of [h, w, T] (channels last)
    maps = [torch.rand((h, w, 5), generator=g).permute(2, 0, 1) for h, w in grids]
    canvas, count = torch.zeros(5, 40, 48), torch.zeros(1, 40, 48)
    for m, w in zip(maps, windows, strict=True):
        canvas[:, w.top : w.bottom, w.left : w.right] += F.interpolate(
            m[None].contiguous(), size=w.size, mode="bilinear", align_corners=False
        )[0]
        count[:, w.top : w.bottom, w.left : w.right] += 1
    merged = steps.merge_windows(maps, windows, (40, 48))
    torch.testing.assert_close(merged, canvas / count, rtol=0, atol=1e-7)
    assert merged[:, 0, 20].tolist() != merged[:, 0, 40].tolist()  # overlap and single differ


def test_scratch_reuses_a_buffer_while_it_fits_and_lets_a_much_larger_one_go():
    scratch = steps.Scratch()
    first = scratch.take("maps", (4, 10, 10), torch.device("cpu"))
    smaller = scratch.take("maps", (3, 10, 10), torch.device("cpu"))
    assert smaller.shape == (3, 10, 10)
    assert smaller.data_ptr() == first.data_ptr()  # the same memory, no page faults
    larger = scratch.take("maps", (5, 10, 10), torch.device("cpu"))
    assert larger.shape == (5, 10, 10) and larger.data_ptr() != first.data_ptr()
    tiny = scratch.take("maps", (1, 10, 10), torch.device("cpu"))  # a fifth: not kept
    assert tiny.data_ptr() != larger.data_ptr()
    assert scratch.take("other", (1, 10, 10), torch.device("cpu")).data_ptr() != tiny.data_ptr()


def test_upsampling_into_a_buffer_is_interpolate_bit_for_bit():
    maps = torch.rand((6, 9, 13), generator=torch.Generator().manual_seed(0))
    for size in [(40, 31), (5, 6), (9, 13)]:
        out = torch.full((6, *size), float("nan"))
        assert steps.upsample(maps, size, out) is out
        expected = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        assert torch.equal(out, expected)
