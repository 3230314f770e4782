"""Decoding images in worker processes: each input becomes the model's tensor and a display
copy of bounded size, or the reason it cannot be used; workers die with their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..backend import Preprocess
from ..data.captions import as_list
from ..data.images import ImageError, load_image
from ..data.inputs import InputItem

# Overlays, heatmaps and upsampled maps are rendered with their long side at most this many
# pixels: a 100-megapixel photo must not need gigabytes per prompt.
RENDER_MAX_SIDE = 4096


@dataclass
class Decoded:
    """One decoded input: `tensor` for the model, `pixels` (uint8 `[h, w, 3]`, the image
    scaled to the render size), its original `size` (width, height) and the `crop`
    (left, top, right, bottom) in display pixels that the model saw; or an `error`.

    `pixels` is a tensor when shared memory has room for it (a worker then hands it over
    without a copy; a pickled array is copied through a pipe and unpickled by the model's
    process), else an array."""

    index: int
    tensor: torch.Tensor | None = None
    pixels: torch.Tensor | np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    error: str | None = None

    @property
    def display(self) -> np.ndarray | None:
        """The display image as uint8 `[h, w, 3]` (a view, no copy)."""
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels.numpy()
        return self.pixels


def display_image(image: Image.Image, max_side: int) -> Image.Image:
    """`image` scaled down so that its long side is at most `max_side` (never up)."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def scaled_box(
    box: tuple[int, int, int, int], src: tuple[int, int], dst: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A box on an image of size `src` (width, height) on the same image at size `dst`."""
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    left, top, right, bottom = box
    return (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))


class DecodedImages(torch.utils.data.Dataset):
    """Decodes and preprocesses in DataLoader workers; a bad file yields its error, not an
    exception, so one bad file never stops a run."""

    def __init__(
        self,
        items: Sequence[InputItem],
        preprocess: Preprocess,
        max_pixels: int,
        max_side: int = RENDER_MAX_SIDE,
        shared: bool = False,
    ) -> None:
        self.items, self.preprocess = items, preprocess
        self.max_pixels, self.max_side = max_pixels, max_side
        self.shared = shared  # display images as tensors, for shared memory

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        if self.items[i].error is not None:
            return Decoded(i, error=self.items[i].error)
        try:
            image = load_image(self.items[i].path, self.max_pixels)
            tensor = self.preprocess(image)
            shown = display_image(image, self.max_side)
            size = (image.width, image.height)
            crop = scaled_box(self.preprocess.crop_box(*size), size, shown.size)
            pixels = torch.from_numpy(np.array(shown)) if self.shared else np.asarray(shown)
            return Decoded(i, tensor, pixels, size, crop)
        except ImageError as e:
            return Decoded(i, error=str(e))
        except MemoryError:
            return Decoded(i, error="out of memory decoding this image; lower `max_pixels`")
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the run
            return Decoded(i, error=f"{type(e).__name__}: {e}")


def die_with_parent(_worker_id: int = 0) -> None:
    """Ask Linux to kill this worker when its parent dies (a `kill -9` of the run would
    otherwise leave decoding workers behind, holding their memory)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the request: nobody will read us
            os._exit(0)


# Shared memory (/dev/shm) a run may fill with display images in flight before they go
# through pipes instead: containers often give it 64 MB, where a few batches of large
# photos would not fit and the workers would die of a bus error.
SHARED_MEMORY_NEEDED = 2 << 30


def shared_memory_has_room(needed: int = SHARED_MEMORY_NEEDED) -> bool:
    """Whether /dev/shm (where tensors handed between processes live) has `needed` bytes."""
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free >= needed
    except OSError:
        return False


def image_loader(
    items: Sequence[InputItem],
    preprocess: Preprocess,
    batch_size: int,
    workers: int,
    max_pixels: int,
    max_side: int = RENDER_MAX_SIDE,
) -> torch.utils.data.DataLoader:
    """Batches of `Decoded` inputs, decoded in `workers` processes (0: in this one)."""
    shared = workers > 0 and shared_memory_has_room()
    return torch.utils.data.DataLoader(
        DecodedImages(items, preprocess, max_pixels, max_side, shared),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=as_list,
        worker_init_fn=die_with_parent if workers else None,
    )
