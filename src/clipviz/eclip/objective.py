"""ECLIP's objective: frozen text embeddings, the masked-max-pooled image embedding `z`, the
loss of one global micro-batch (gathered over ranks) and validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backend import Backend
from ..data.captions import CaptionImages, CaptionSet, as_list
from .config import TrainConfig
from .head import ExplainHead, free_attention_mask, frozen_features, masked_max_pool
from .losses import pair_loss
from .state import Dist, gather

TEXT_CHUNK = 256


class TextBank:
    """Frozen text embeddings of a set's unique captions, computed on first use in fixed
    chunks of caption ids (the same chunks in every run and on every rank)."""

    def __init__(self, backend: Backend, captions: Sequence[str]) -> None:
        self.backend, self.captions = backend, captions
        self.chunks: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, chunk: int) -> torch.Tensor:
        b = self.backend
        tokens = b.tokenizer(list(self.captions[chunk * TEXT_CHUNK : (chunk + 1) * TEXT_CHUNK]))
        with b.autocast():
            emb = b.model.encode_text(tokens.to(b.device))
        return F.normalize(emb.float(), dim=-1)

    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        """Unit-length embeddings `[len(ids), D]` on the model's device (`ids` not empty)."""
        for chunk in sorted({i // TEXT_CHUNK for i in ids} - self.chunks.keys()):
            self.chunks[chunk] = self._encode(chunk)
        return torch.stack([self.chunks[i // TEXT_CHUNK][i % TEXT_CHUNK] for i in ids])


def pooled_embeddings(
    backend: Backend, head: ExplainHead, images: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`z` (masked max pooling of the explain features) `[B, D]` and the stock image embedding."""
    feats = frozen_features(backend, images)
    mask = free_attention_mask(feats.free_attention, config.mask_rule, config.mask_value)
    return masked_max_pool(head.features(feats.tokens), mask), feats.stock_embedding


def eclip_loss(
    z: torch.Tensor,
    text: torch.Tensor,
    stock: torch.Tensor,
    caption_ids: torch.Tensor,
    scale: torch.Tensor | float,
    distill: float,
    bias: float | None = None,
) -> torch.Tensor:
    """The model's own loss of `z` against the captions (sigmoid with the model's `bias` for
    SigLIP, InfoNCE for CLIP), plus `distill·(1 − cos(z, stock))`."""
    loss = pair_loss(z, text, scale, caption_ids, bias)
    if distill:
        loss = loss + distill * (1.0 - (z * stock).sum(dim=-1)).mean()
    return loss


@dataclass
class Micro:
    loss: torch.Tensor | None
    images: int  # valid images in the global batch
    failed: list[int]  # local dataset indices that could not be decoded


def micro_step(
    backend: Backend,
    head: ExplainHead,
    scale: torch.Tensor | float,
    batch: list[tuple[int, torch.Tensor | None, str | None]],
    caption_ids: Sequence[int],
    bank: TextBank,
    config: TrainConfig,
    d: Dist,
) -> Micro:
    """The global batch's loss on this rank (bad images dropped, the rest padded to a fixed
    local size so every rank gathers tensors of one shape)."""
    good = [(i, x) for i, x, err in batch if err is None and x is not None]
    failed = [i for i, x, err in batch if err is not None or x is None]
    local, dev = config.batch_size // d.world, backend.device
    dim = head.proj.shape[1]
    ids = [caption_ids[i] for i, _ in good]
    if good:
        z, stock = pooled_embeddings(backend, head, torch.stack([x for _, x in good]), config)
        text = bank(ids)
    else:
        z = stock = text = torch.zeros(0, dim, device=dev)
    pad = local - len(good)
    z = torch.cat([z, z.new_zeros(pad, dim)])
    text = torch.cat([text, text.new_zeros(pad, dim)])
    stock = torch.cat([stock, stock.new_zeros(pad, dim)])
    id_tensor = torch.tensor(ids + [-1] * pad, device=dev, dtype=torch.long)
    z, text, stock, id_tensor = (gather(t, d) for t in (z, text, stock, id_tensor))
    keep = id_tensor >= 0
    n = int(keep.sum())
    if n == 0:
        return Micro(None, 0, failed)
    loss = eclip_loss(
        z[keep], text[keep], stock[keep], id_tensor[keep], scale, config.distill,
        backend.logit_bias,
    )  # fmt: skip
    return Micro(loss, n, failed)


@torch.no_grad()
def validate(
    backend: Backend,
    head: ExplainHead,
    val: CaptionSet,
    bank: TextBank,
    config: TrainConfig,
    scale: float,
) -> dict[str, float]:
    """Held-out contrastive loss (in batches of `batch_size`, file order) and image→text
    retrieval top-1 over the set's distinct captions."""
    loader = torch.utils.data.DataLoader(
        CaptionImages(val.images, backend.preprocess, config.max_pixels),
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=as_list,
    )
    zs, ids, failed = [], [], 0
    for batch in loader:
        good = [(i, x) for i, x, err in batch if err is None and x is not None]
        failed += len(batch) - len(good)
        if good:
            zs.append(
                pooled_embeddings(backend, head, torch.stack([x for _, x in good]), config)[0]
            )
            ids += [val.caption_ids[i] for i, _ in good]
    result: dict[str, float] = {"val_images": len(ids), "val_unreadable": failed}
    if not ids:
        return result
    z, id_tensor = torch.cat(zs), torch.tensor(ids, device=backend.device)
    total = 0.0
    for s in range(0, len(ids), config.batch_size):
        part = slice(s, s + config.batch_size)
        loss = pair_loss(z[part], bank(ids[part]), scale, id_tensor[part], backend.logit_bias)
        total += float(loss) * len(ids[part])
    distinct = sorted(set(ids))
    best = (z @ bank(distinct).T).argmax(dim=1)
    predicted = torch.tensor(distinct, device=backend.device)[best]
    result["val_loss"] = total / len(ids)
    result["val_top1"] = float((predicted == id_tensor).float().mean())
    return result
