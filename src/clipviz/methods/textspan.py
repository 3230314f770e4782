"""TextSpan's decomposition: the direct contribution of every attention head (of every block,
or of the last ones) to the image embedding, by source token (Gandelsman, Efros, Steinhardt).

The class token's output is a sum of what each block's heads and MLP added to it. With the
final `ln_post` linearised at the image's own statistics (mean μ and `σ = √(var + eps)` of
the final class token, its mean and bias spread evenly over all entries) and `proj` linear,
the image embedding splits exactly into entries: head `h` of block `l` reading source token
`m` contributes `attn[l, h, cls → m] · v_h[m] · W_O,h + b_O/(M·H)`, normalised as above,
projected and divided by the embedding's norm. Its cosine with a text is that head's map
value at `m`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from ..backend.vit import attention_probs
from ..errors import ClipvizError
from .registry import MapResult, register


@dataclass(frozen=True)
class HeadReads:
    """What the heads of the decomposed blocks read, and the final statistics.

    blocks: the decomposed block indices; attention: per block the class token's attention
    `[B, heads, M]`; values: per block `[B, heads, M, d]`; mean, std: of the final class
    token `[B]`; norm: of the unnormalised image embedding `[B]`.
    """

    blocks: list[int]
    attention: list[Tensor]
    values: list[Tensor]
    mean: Tensor
    std: Tensor
    norm: Tensor
    embeddings: Tensor

    @property
    def tokens(self) -> int:
        return self.values[0].shape[2]

    @property
    def heads(self) -> int:
        return self.values[0].shape[1]


def read_heads(backend: Backend, images: Tensor, layers: int) -> HeadReads:
    """Run the forward, keeping what the heads of the last `layers` blocks read (those blocks
    computed from their own q, k, v: each is projected once)."""
    vit = backend.readout_vit
    if not 1 <= layers <= vit.depth:
        raise ClipvizError(f"textspan: layers={layers} is outside 1…{vit.depth}, the blocks")
    first = vit.depth - layers
    attention, values = [], []
    with torch.no_grad(), backend.autocast():
        x = vit.run_blocks(vit.embed(images), stop=first)
        for i in range(first, vit.depth):
            q, k, v = vit.qkv(i, vit.norm1(i, x))
            probs = attention_probs(q, k)  # [B, heads, M, M]
            attention.append(probs[:, :, 0].float())  # the class token's row
            values.append(v.float())
            y = x + vit.attn_out(i, probs.to(v.dtype) @ v)
            x = y + vit.mlp(i, y)
        embeddings = vit.pooled(x).float()
    final = x[:, 0].float()
    eps = float(vit.post_norm.eps)
    return HeadReads(
        blocks=list(range(first, vit.depth)),
        attention=attention,
        values=values,
        mean=final.mean(dim=-1),
        std=(final.var(dim=-1, unbiased=False) + eps).sqrt(),
        norm=embeddings.norm(dim=-1),
        embeddings=embeddings,
    )


def _entries(backend: Backend) -> int:
    """Entries the reference spreads `ln_post`'s mean and bias over, per source and head:
    every block's attention and MLP plus the embedding (`2·depth + 1`)."""
    return 2 * backend.vit.depth + 1


def head_maps(backend: Backend, reads: HeadReads, texts: Tensor) -> Tensor:
    """Per (image, text, decomposed head, source token) the entry's cosine share with the
    unit `texts` `[T, D]`: `[B, T, blocks·heads, M]` (sums to `cos(image, text)` with the
    entries of the MLPs, the embedding and the earlier blocks)."""
    vit = backend.linear_head_vit
    norm = vit.post_norm
    M, H = reads.tokens, reads.heads
    share = _entries(backend) * M * H
    read_dir = texts.float() @ vit.proj.float().T  # [T, W]: the text read in the stream
    gamma = norm.weight.float() * read_dir  # [T, W]
    beta = read_dir @ norm.bias.float()  # [T]
    per_block = []
    for i, attn, values in zip(reads.blocks, reads.attention, reads.values, strict=True):
        directions = vit.head_directions(i, gamma.to(values.dtype)).float()  # [heads, d, T]
        mixed = attn[..., None] * values  # [B, heads, M, d]
        dot = torch.einsum("bhmd,hdt->bthm", mixed, directions)
        zeros = values.new_zeros(1, H, 1, values.shape[-1])
        bias = vit.attn_out(i, zeros).float()[0, 0]  # [W]: out_proj's bias after layer scale
        dot = dot + (gamma @ bias)[None, :, None, None] / (M * H)
        centred = (
            dot - (reads.mean[:, None] / share)[..., None, None] * gamma.sum(-1)[:, None, None]
        )
        entry = centred / reads.std[:, None, None, None] + beta[:, None, None] / share
        per_block.append(entry / reads.norm[:, None, None, None])
    return torch.cat(per_block, dim=2)


def head_embeddings(backend: Backend, reads: HeadReads) -> Tensor:
    """Each decomposed head's whole direct contribution to the image embedding (its entries
    summed over the source tokens): `[B, blocks·heads, D]`, the vectors TextSpan describes
    with texts (the reference's `attentions.sum(axis=2)`)."""
    vit = backend.linear_head_vit
    norm = vit.post_norm
    H = reads.heads
    share = _entries(backend) * H  # per head: the mean and bias of all its M entries
    rows = []
    for i, attn, values in zip(reads.blocks, reads.attention, reads.values, strict=True):
        mixed = (attn[..., None] * values).sum(dim=2)  # [B, heads, d]
        bias = vit.attn_out(i, values.new_zeros(1, H, 1, values.shape[-1])).float()[0, 0]
        out = vit.head_outputs(i, mixed).float() + bias / H  # [B, heads, W]
        centred = out - (reads.mean / share)[:, None, None]
        entry = centred * norm.weight.float() / reads.std[:, None, None] + norm.bias.float() / share
        rows.append((entry @ vit.proj.float()) / reads.norm[:, None, None])
    return torch.cat(rows, dim=1)


def text_span(
    data: Tensor, texts: Tensor, count: int = 10, rank: int = 80
) -> tuple[list[int], float]:
    """TextSpan's greedy description of one head from its outputs over images `[N, D]`
    (the reference's `replace_with_iterative_removal`): the indices of `count` texts of the
    bank `[U, D]`, and the share of the head's variance over the images they explain.

    The texts are projected onto the span of the top `rank` right singular vectors of the
    outputs; then, `count` times, the text along which the centred outputs vary most (by
    standard deviation) is chosen and its direction removed from outputs and texts.
    """
    if data.shape[0] < 2:
        raise ClipvizError("textspan: describing heads needs at least 2 images")
    data, texts = data.double(), texts.double()
    _, _, vh = torch.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    texts = (vh.T @ torch.linalg.inv(vh @ vh.T) @ vh @ texts.T).T  # onto the span of W_OV
    data = data - data.mean(dim=0, keepdim=True)
    total = float(data.pow(2).sum())
    chosen: list[int] = []
    for _ in range(min(count, texts.shape[0])):
        top = int((data @ texts.T).std(dim=0).argmax())
        chosen.append(top)
        direction = texts[top]
        length = direction @ direction
        data = data - (data @ direction / length)[:, None] * direction
        texts = texts - (texts @ direction / length)[:, None] * direction
    explained = 1.0 - float(data.pow(2).sum()) / total if total > 0 else 0.0
    return chosen, explained


@register(
    "textspan",
    towers=(TOKENS,),
    ranges={"layers": "[1, 256]"},
    needs={TOKENS: ("attention", "linear_head")},
    summary="TextSpan decomposition: each head's direct contribution of every patch to the "
    "image-text cosine, summed over the heads of every block; per-head maps kept",
    citation="Yossi Gandelsman, Alexei A. Efros, Jacob Steinhardt: Interpreting CLIP's Image "
    "Representation via Text-Based Decomposition, ICLR 2024",
    reference="yossigandelsman/clip_text_span, prs_hook.py (compute_attentions_spatial, "
    "_normalize_attentions_spatial), utils/transformer.py (forward_per_head), demo.ipynb and "
    "compute_segmentations.py (the spatial map: every layer's heads summed)",
    defaults="every block, as the authors' spatial maps (`attentions[:, :, 1:].sum(axis=(1, 3))`); "
    "per entry `attn[cls→m]·v_m·W_O,h + b_O/(M·H)`, the final `ln_post`'s mean and bias "
    "spread over all `2·depth+1` components, `@ proj`, divided by the embedding's norm; "
    "per-head maps in `maps.npz` (`head_maps`, `heads`); `clipviz heads` describes each "
    "head of the last 4 blocks by texts (`compute_complete_text_set.py`: 10 texts per head,"
    " rank 80)",
)
def textspan(
    backend: Backend, images: Tensor, texts: Texts, layers: int | None = None
) -> MapResult:
    """TextSpan: `Σ_{l, h} entry[l, h, m] · text` over the heads of the last `layers` blocks.

    layers: the last blocks decomposed; None: every block, as the authors' spatial maps
        (demo.ipynb, compute_segmentations.py); 4 is their head descriptions' setting
        (`compute_complete_text_set.py --num_of_last_layers 4`, `clipviz heads`).

    The per-head maps are kept as `head_maps` `[B, T, layers·heads, h, w]` (labels `heads`,
    "L<block>.H<head>"). The class token's own source entry is left out of the maps.
    """
    vit = backend.vit
    reads = read_heads(backend, images, vit.depth if layers is None else layers)
    entries = head_maps(backend, reads, texts.embeddings.to(images.device))
    patches = entries[..., vit.prefix :]  # [B, T, blocks·heads, N]
    h, w = backend.grid_size(images)
    per_head = patches.reshape(*patches.shape[:3], h, w)
    names = [f"L{i}.H{j}" for i in reads.blocks for j in range(reads.heads)]
    return MapResult(
        per_head.sum(dim=2),
        reads.embeddings,
        extras={"head_maps": per_head},
        labels={"heads": [names]},
    )
