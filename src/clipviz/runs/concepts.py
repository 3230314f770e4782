"""`clipviz concepts` runs: ConVis maps of chosen or discovered concepts for many images, with
the same outputs and manifest as an explain run, and image embeddings for the OOD check."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..backend import Backend
from ..convis.bank import ConceptBank
from ..convis.maps import concept_maps
from ..convis.nouns import noun_database
from ..convis.windows import square_box
from ..data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from ..data.inputs import InputItem
from ..errors import ClipvizError
from ..explanation import Explanation
from .manifest import MANIFEST, append_record
from .outputs import RenderOptions, write_outputs
from .prepare import prepare_run


def _describe(name: str) -> tuple[str, str]:
    """A synset's first lemma and its definition."""
    db = noun_database()
    i = db.position[name]
    return db.lemmas[i][0].replace("_", " "), db.definitions[i]


def concepts_one(
    backend: Backend,
    bank: ConceptBank,
    item: InputItem,
    chosen: Sequence[str],
    options: dict[str, Any],
    out: Path,
    render: RenderOptions,
    max_pixels: int,
) -> dict[str, Any]:
    """Maps, files and the manifest record of one image (written to the manifest too).

    options: `variant`, `seed`, `top`, `batch_size` of `concept_maps`.
    """
    started = time.perf_counter()
    rec: dict[str, Any] = {"input": item.key, "output": str(item.rel)}
    try:
        image = load_image(item.path, max_pixels)
    except ImageError as e:
        rec.update(status="failed", error=str(e), outputs=[], seconds=0.0)
        return append_record(out / MANIFEST, rec)
    result = concept_maps(backend, image, chosen, bank=bank, **options)
    x = backend.preprocess(Image.fromarray(result.square))[None]
    idx = [bank.hierarchy.index(c) for c in result.concepts]
    image_emb = backend.image_embeddings(x).float()
    scores = (image_emb @ bank.embeddings[idx].float().T).cpu()  # [1, S]
    probs = backend.probabilities(scores)
    explanation = Explanation(
        method=f"convis-{options['variant']}",
        prompts=result.concepts,
        maps=result.maps[None].float(),
        scores=scores,
        probs=probs,
    )
    square = np.asarray(image.crop(square_box(image.size)))
    written = write_outputs(out / item.rel, square, [explanation], 0, render)
    found = {d.synset for d in result.discovered}
    rec.update(
        status="ok",
        error=None,
        outputs=written.files,
        prompt_files=written.prompt_files,
        size=[image.width, image.height],
        crop=list(square_box(image.size)),
        concepts=[
            {
                "synset": name,
                "lemma": _describe(name)[0],
                "definition": _describe(name)[1],
                "best_rank": rank,
                "score": float(score),
                "discovered": name in found,
            }
            for name, rank, score in zip(
                result.concepts, result.best_ranks, scores[0].tolist(), strict=True
            )
        ],
        seconds=round(time.perf_counter() - started, 4),
    )
    return append_record(out / MANIFEST, rec)


def run_concepts(
    backend: Backend,
    bank: ConceptBank,
    items: Sequence[InputItem],
    chosen: Sequence[str],
    out: Path,
    options: dict[str, Any],
    render: RenderOptions = RenderOptions(),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    run_info: dict[str, Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """ConVis maps of `chosen` (and `options["top"]` discovered) concepts for every item;
    writes `run.json`, each image's outputs and one manifest record per image.

    overwrite: write into a folder that holds files but no clipviz run, or another kind of run.
    """
    fields = {
        "model": backend.identity,
        "device": str(backend.device),
        "method": f"convis-{options['variant']}",
        "concepts": list(chosen),
        "hierarchy_size": len(bank.hierarchy),
        **(run_info or {}),
        **options,
    }
    with prepare_run(out, "concepts", fields, overwrite=overwrite):
        records = []
        for item in items:
            rec = concepts_one(backend, bank, item, chosen, options, out, render, max_pixels)
            records.append(rec)
            if on_record:
                on_record(rec)
    return records


def embed_images(
    backend: Backend, items: Sequence[InputItem], batch_size: int
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Image embeddings `[N, D]` of the readable items, and (path, error) of the others."""
    if batch_size < 1:
        raise ClipvizError(f"`batch_size` {batch_size} must be at least 1")
    tensors, failed = [], []
    for item in items:
        try:
            tensors.append(backend.preprocess(load_image(item.path)))
        except ImageError as e:
            failed.append((str(item.path), str(e)))
    if not tensors:
        raise ClipvizError("none of the images could be read", exit_code=1)
    chunks = [
        backend.image_embeddings(torch.stack(tensors[i : i + batch_size])).cpu()
        for i in range(0, len(tensors), batch_size)
    ]
    return torch.cat(chunks), failed
