"""Text embeddings: the prompt ensemble, and caches in memory and on disk."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path

# CLIP's 80 ImageNet templates plus the scene templates used by CLIP Surgery / ECLIP.
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def ensemble_templates() -> list[str]:
    """The prompt-ensemble templates, each with one `{}`."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + list(SCENE_TEMPLATES)


@dataclass(frozen=True)
class Texts:
    """Prompts and their unit-length embeddings `[T, D]`."""

    prompts: list[str]
    embeddings: torch.Tensor  # [T, D]
    ensemble: bool


Embed = Callable[[list[str], bool], list[torch.Tensor]]  # (prompts, ensemble) -> rows
Progress = Callable[[int, int], None]  # (done, total)
# prompts embedded (and cached) at a time: 32 x 85 templates = 2,720 sentences
PROMPT_CHUNK_ENSEMBLE, PROMPT_CHUNK = 32, 512


@dataclass
class TextCache:
    """Unit text embeddings per (prompt, ensemble): in memory, and on disk under `folder`
    (one `.npy` per prompt; a read-only or missing folder only costs speed)."""

    folder: Path | None
    memory: dict[tuple[str, bool], torch.Tensor] = field(default_factory=dict, repr=False)

    def get(
        self,
        prompts: Sequence[str],
        ensemble: bool,
        embed: Embed,
        progress: Progress | None = None,
    ) -> list[torch.Tensor]:
        """The embeddings of `prompts` (CPU), computing with `embed` only what no cache has.

        Missing prompts are embedded in chunks, each stored as soon as it is done (a killed
        run loses at most one chunk; memory holds one chunk's template embeddings);
        `progress(done, total)` follows the chunks.
        """
        missing = [p for p in dict.fromkeys(prompts) if (p, ensemble) not in self.memory]
        for p in list(missing):
            if (cached := self._load(p, ensemble)) is not None:
                self.memory[(p, ensemble)] = cached
                missing.remove(p)
        step = PROMPT_CHUNK_ENSEMBLE if ensemble else PROMPT_CHUNK
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            for p, emb in zip(chunk, embed(chunk, ensemble), strict=True):
                self.memory[(p, ensemble)] = emb
                self._store(p, ensemble, emb)
            if progress:
                progress(min(start + step, len(missing)), len(missing))
        return [self.memory[(p, ensemble)] for p in prompts]

    def _file(self, prompt: str, ensemble: bool) -> Path | None:
        if self.folder is None:
            return None
        digest = hashlib.sha1(
            f"{int(ensemble)}\0{prompt}".encode("utf-8", "surrogateescape")
        ).hexdigest()
        return self.folder / f"{digest}.npy"

    def _load(self, prompt: str, ensemble: bool) -> torch.Tensor | None:
        path = self._file(prompt, ensemble)
        if path is None or not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            return None

    def _store(self, prompt: str, ensemble: bool, emb: torch.Tensor) -> None:
        path = self._file(prompt, ensemble)
        if path is None:
            return
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, emb.numpy().astype(np.float32), allow_pickle=False)
        except OSError:
            pass  # a read-only cache only costs speed
