"""Open-vocabulary segmentation of a batch of images with a loaded backend and a registered
method, by the field's protocol (docs/segmentation.md): resize, slide windows, merge, refine,
classify.

The windows of every image of a batch go through the model together, grouped by size; the
names' text embeddings are computed once, when the `Segmenter` is built; the steps after the
model run on the backend's device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backend import Backend, Texts, ensemble_templates
from ..backend.text import SCENE_TEMPLATES
from ..errors import ClipvizError
from ..methods import check_methods, get_method
from .classes import ClassNames
from .grid_labels import grid_labels
from .pamr import pamr
from .protocol import Protocol, Scratch, classify, merge_windows, upsample
from .proxy import attached_proxy
from .resize import resize_image
from .windows import Window, window_grid

# windows through the model at once (the windows of a batch's images, in chunks)
WINDOW_BATCH = 32


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, each with one `{}`: the reference segmentors'
    prompts (clipviz's own ensemble adds 5 scene templates to these)."""
    return [t for t in ensemble_templates() if t not in SCENE_TEMPLATES]


def name_embeddings(
    backend: Backend, names: Sequence[str], progress: Callable[[int, int], None] | None = None
) -> Texts:
    """The names' text embeddings `[Q, D]` as the reference computes them: each name in the 80
    templates, every sentence embedded and normalised, the mean normalised again."""
    templates = imagenet_templates()
    sentences = [t.format(n) for n in names for t in templates]
    rows = backend.encode_texts(sentences, ensemble=False, progress=progress).embeddings
    mean = rows.float().view(len(names), len(templates), -1).mean(dim=1)
    return Texts(list(names), F.normalize(mean, dim=-1), ensemble=True)


def patch_unit(backend: Backend) -> tuple[int, int]:
    """The input pixels per map cell `(h, w)` of the backend's image tower (a ViT's patch)."""
    h, w = backend.input_size
    gh, gw = backend.vision.grid((h, w))
    return h // gh, w // gw


def pad_sizes(h: int, w: int, multiple: int) -> tuple[int, int, int, int]:
    """The zero padding `(left, right, top, bottom)` that brings an `h × w` window to a
    multiple of `multiple` (0: none), centred, the odd pixel right and below (ProxyCLIP's
    `compute_padsize`)."""
    if multiple <= 0:
        return 0, 0, 0, 0
    across, down = -w % multiple, -h % multiple
    return across // 2, across - across // 2, down // 2, down - down // 2


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A uint8 `[H, W, 3]` RGB array (PIL images are converted to RGB as they are)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return image


@dataclass
class Segmentation:
    """One image's result: labels at the original size, or the reason it failed.

    labels: `[H, W]` int64 class indices; probs: `[K, H, W]` class probabilities (CPU) when
    asked for; resized: the `(H, W)` the windows slid over; windows: how many there were.
    """

    labels: np.ndarray | None
    probs: torch.Tensor | None = None
    resized: tuple[int, int] = (0, 0)
    windows: int = 0
    error: str | None = None


@dataclass
class _Prepared:
    original: tuple[int, int]
    image: torch.Tensor  # [3, h, w] normalised, resized, on the device
    windows: list[Window]


class Segmenter:
    """Segments images into `classes` with `method`'s maps and the `protocol`'s settings.

    options: the method's options (as for `explain`); window_batch: windows per forward pass;
    progress: called with (done, total) sentences while the names are embedded.
    """

    def __init__(
        self,
        backend: Backend,
        classes: ClassNames,
        method: str = "sclip",
        protocol: Protocol = Protocol(),
        options: dict[str, Any] | None = None,
        window_batch: int = WINDOW_BATCH,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        protocol.check()
        if window_batch < 1:
            raise ClipvizError(f"`window_batch` {window_batch} must be at least 1")
        spec = get_method(method)
        check_methods(backend, [spec.name])
        self.backend, self.classes, self.protocol = backend, classes, protocol
        self.method, self.window_batch = spec, window_batch
        self.options = spec.info.bind(options)
        if any(o.name == "proxy" for o in spec.options):  # a bad proxy fails before any image
            attached_proxy(backend, self.options.get("proxy", spec.info.option("proxy").default))
        self.unit = patch_unit(backend)
        self.scratch = Scratch()  # the steps after the model reuse their buffers
        self.texts = name_embeddings(backend, classes.names, progress)
        self.name_class = torch.tensor(classes.name_class, device=backend.device)
        mean = torch.tensor(backend.preprocess.mean, device=backend.device) * 255
        std = torch.tensor(backend.preprocess.std, device=backend.device) * 255
        self._mean, self._std = mean.view(3, 1, 1), std.view(3, 1, 1)

    def prepare(self, image: Image.Image | np.ndarray) -> _Prepared:
        """Resize, normalise (in 0 … 255 units, as mmseg's preprocessor) and lay the windows."""
        array = as_array(image)
        resized = resize_image(array, self.protocol.short_side)
        x = torch.from_numpy(np.require(resized, requirements=["C", "W"])).to(self.backend.device)
        x = (x.permute(2, 0, 1).float() - self._mean) / self._std
        h, w = resized.shape[:2]
        windows = window_grid(h, w, self.protocol.window, self.protocol.stride)
        return _Prepared((array.shape[0], array.shape[1]), x, windows)

    def window_maps(
        self, prepared: Sequence[_Prepared | None]
    ) -> tuple[dict[tuple[int, int], torch.Tensor], dict[int, str]]:
        """Cosine maps `[Q, h, w]` of every window of every image, keyed (image, window), the
        windows of equal size through the model together; and the images that cannot be
        segmented, with the reason. A window's pixels past its last whole patch are not seen
        (as a strided patch convolution leaves them)."""
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        failed: dict[int, str] = {}
        for i, p in enumerate(prepared):
            if p is None:
                continue
            for j, w in enumerate(p.windows):
                h, wd = w.size
                seen = (h - h % self.unit[0], wd - wd % self.unit[1])
                if self.protocol.pad:  # padded whole; the method leaves out what it cannot see
                    seen = (h, wd)
                if min(seen) == 0:
                    failed[i] = (
                        f"its {h}x{wd} window is smaller than one {self.unit[0]}x{self.unit[1]} "
                        "patch; use a larger `short_side`"
                    )
                    break
                groups[seen].append((i, j))
        out: dict[tuple[int, int], torch.Tensor] = {}
        # a method that scores each window with its whole image's embedding (CASS) offers it
        with_images = getattr(self.method.fn, "with_image_embeddings", None)
        whole: dict[int, torch.Tensor] = {}
        for (sh, sw), keys in groups.items():
            keys = [k for k in keys if k[0] not in failed]
            for start in range(0, len(keys), self.window_batch):
                chunk = keys[start : start + self.window_batch]
                ready = [(p, p.windows[j]) for i, j in chunk if (p := prepared[i]) is not None]
                crops = torch.stack(
                    [p.image[:, w.top : w.top + sh, w.left : w.left + sw] for p, w in ready]
                )
                left, right, top, bottom = pads = pad_sizes(sh, sw, self.protocol.pad)
                if any(pads):
                    crops = F.pad(crops, pads)
                if with_images is None:
                    maps = self.method.fn(self.backend, crops, self.texts, **self.options).maps
                else:
                    for (i, _), (p, _) in zip(chunk, ready, strict=True):
                        if i not in whole:
                            whole[i] = self.backend.image_embeddings(p.image[None])[0]
                    embeddings = torch.stack([whole[i] for i, _ in chunk])
                    maps = with_images(
                        self.backend, crops, self.texts, embeddings, **self.options
                    ).maps
                for key, m in zip(chunk, maps.float(), strict=True):
                    if any(pads):  # at the padded window's pixels, the window cut out
                        m = upsample(m, (crops.shape[-2], crops.shape[-1]))
                        m = m[:, top : top + sh, left : left + sw]
                    out[key] = m
        return out, failed

    def segment_one(self, p: _Prepared, maps: list[torch.Tensor], keep_probs: bool) -> Segmentation:
        """The steps after the model for one image (`maps`: its windows' cosine maps)."""
        size = (int(p.image.shape[1]), int(p.image.shape[2]))
        if not all(bool(torch.isfinite(m).all()) for m in maps):
            return Segmentation(None, resized=size, windows=len(maps), error=(
                f"{self.method.name} gave scores that are not finite (NaN or inf) for this "
                "image; try `precision` fp32"))  # fmt: skip
        merged = merge_windows(maps, p.windows, size, self.scratch)
        classes = len(self.classes)
        if not keep_probs and not self.protocol.pamr_steps:  # decided on the grid where it can
            labels = grid_labels(merged, p.original, self.name_class, classes, self.protocol)
            return Segmentation(labels.cpu().numpy(), resized=size, windows=len(maps))
        cosines = upsample(merged, p.original, self.scratch.take("cosines", (len(merged),
                                                                 *p.original), merged.device))  # fmt: skip
        if self.protocol.pamr_steps:
            guide = upsample(p.image, p.original)
            cosines = pamr(guide[None], cosines[None], self.protocol.pamr_steps,
                           self.protocol.pamr_dilations)[0]  # fmt: skip
        labels, probs = classify(cosines, self.name_class, classes, self.protocol)
        return Segmentation(
            labels.cpu().numpy(),
            probs.cpu() if keep_probs else None,
            resized=size,
            windows=len(maps),
        )

    def __call__(
        self, images: Sequence[Image.Image | np.ndarray], keep_probs: bool = False
    ) -> list[Segmentation]:
        """Segment a batch of RGB images (PIL or uint8 `[H, W, 3]`, upright); one result per
        image, in order (an image that cannot be segmented gets its reason in `error`).
        keep_probs: also return each image's class probabilities."""
        prepared: list[_Prepared | None] = []
        failed: dict[int, str] = {}
        for i, image in enumerate(images):
            try:
                prepared.append(self.prepare(image))
            except ClipvizError as e:
                if e.exit_code != 1:
                    raise
                prepared.append(None)
                failed[i] = str(e)
        maps, too_small = self.window_maps(prepared)
        failed.update(too_small)
        results = []
        for i, p in enumerate(prepared):
            if p is None or i in failed:
                results.append(Segmentation(None, error=failed[i]))
                continue
            windows = [maps[(i, j)] for j in range(len(p.windows))]
            results.append(self.segment_one(p, windows, keep_probs))
        return results


def segment(
    backend: Backend,
    images: Sequence[Image.Image | np.ndarray],
    classes: ClassNames,
    method: str = "sclip",
    protocol: Protocol = Protocol(),
    options: dict[str, Any] | None = None,
    keep_probs: bool = False,
) -> list[Segmentation]:
    """Segment `images` into `classes` in one go (build a `Segmenter` to embed the names once
    for many batches)."""
    return Segmenter(backend, classes, method, protocol, options)(images, keep_probs)
