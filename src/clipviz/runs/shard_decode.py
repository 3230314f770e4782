"""Decoding a shard's samples: the tar is read once, by a reader thread of the run's process,
and each sample's bytes handed to one of a few decoding processes; the decoded samples come
back in tar order.

Reading in one place means one pass over the shard's bytes (on a network file system, not
one per decoding process) and the order is the tar's by construction; reading in a thread
means a slow read waits beside the model, not in front of it. A decoding process that dies
(a crashing image library) fails the shard, which the next run redoes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..backend import Preprocess
from ..data.images import ImageError, load_image_bytes
from ..data.shards import ShardSample, read_shard
from .decode import die_with_parent

# samples handed to the decoding processes ahead of the model, per process
AHEAD_PER_WORKER = 4
# samples read from the tar ahead of the decoding (their bytes held in memory)
READ_AHEAD = 16

T = TypeVar("T")


@dataclass
class DecodedSample:
    """One sample of a shard: the model's tensor, or why it cannot be used."""

    index: int
    key: str
    caption: str | None = None
    tensor: torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    error: str | None = None


class IncompleteShard(Exception):
    """A shard whose samples did not all come back from the decoding processes."""


def decode_sample(
    index: int, sample: ShardSample, preprocess: Preprocess, max_pixels: int
) -> DecodedSample:
    """A sample's image as the model's tensor, or the reason it cannot be used."""
    out = DecodedSample(index, sample.key, sample.caption, error=sample.error)
    if sample.error is None and sample.image is not None:
        try:
            image = load_image_bytes(sample.image, max_pixels)
            out.tensor = preprocess(image)
            out.size = (image.width, image.height)
            out.crop = preprocess.crop_box(*out.size)
        except ImageError as e:
            out.error = str(e)
        except Exception as e:  # noqa: BLE001 - one bad sample must not stop the shard
            out.error = f"{type(e).__name__}: {e}"
    return out


_DECODER: dict[str, Any] = {}  # a decoding process's preprocessing, set when it starts


def _start_decoder(preprocess: Preprocess, max_pixels: int) -> None:
    die_with_parent()
    torch.set_num_threads(1)
    _DECODER.update(preprocess=preprocess, max_pixels=max_pixels)


def _decode_in_worker(index: int, sample: ShardSample) -> DecodedSample:
    return decode_sample(index, sample, _DECODER["preprocess"], _DECODER["max_pixels"])


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def read_ahead(items: Iterator[T], depth: int = READ_AHEAD) -> Iterator[T]:
    """The items of `items` in order, produced by a thread at most `depth` ahead of the
    consumer; an exception raised while producing is raised here, after the items before
    it. Closing this iterator stops the thread and closes `items`."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def hand(value: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand(item):
                    return
            hand(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            hand(_Raised(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    reader = threading.Thread(target=produce, name="clipviz-shard-reader", daemon=True)
    reader.start()
    try:
        while (value := ready.get()) is not _END:
            if isinstance(value, _Raised):
                raise value.error
            yield value
    finally:
        stop.set()
        reader.join()


def _batches(samples: Iterable[DecodedSample], size: int) -> Iterator[list[DecodedSample]]:
    batch: list[DecodedSample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def decoded_batches(
    path: Path, preprocess: Preprocess, max_pixels: int, workers: int, batch_size: int
) -> Iterator[list[DecodedSample]]:
    """The samples of shard `path` in tar order, decoded, in batches of `batch_size`: by
    `workers` processes (0: here), at most a few samples each ahead of the model."""
    if workers == 0:
        samples = enumerate(read_ahead(read_shard(path, max_pixels)))
        yield from _batches((decode_sample(i, s, preprocess, max_pixels) for i, s in samples),
                            batch_size)  # fmt: skip
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_decoder,
        initargs=(preprocess, max_pixels),
    )  # fmt: skip
    pool.submit(int).result()  # the decoders are forked now, before the reader thread starts
    samples = enumerate(read_ahead(read_shard(path, max_pixels)))

    def in_order() -> Iterator[DecodedSample]:
        pending: collections.deque[concurrent.futures.Future[DecodedSample]] = collections.deque()
        for i, sample in samples:
            pending.append(pool.submit(_decode_in_worker, i, sample))
            if len(pending) >= AHEAD_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield from _batches(in_order(), batch_size)
    except concurrent.futures.process.BrokenProcessPool as e:
        raise IncompleteShard(
            f"a decoding process died while decoding {path.name} (a crash in an image "
            "library?); its outputs were not kept: run again"
        ) from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
