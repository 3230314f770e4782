"""TextSpan's decomposition against a port of the authors' logger (yossigandelsman/
clip_text_span: `forward_per_head`, `PRSLogger.compute_attentions_spatial`,
`_normalize_attentions_spatial`, `compute_mlps`) on a float64 copy: every block's heads by
source token, every MLP and the embedding, which must sum to the image embedding."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference import _batch, _layer_norm, _out_proj, _qkv, _texts, _vit_input

from clipviz import ClipvizError, explain
from clipviz.methods.textspan import textspan

PROMPTS = ["a dog", "a red square", "grass"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _prs_decomposition(model, images):
    """All entries, normalised as the reference: heads `[B, L, M, H, D]`, MLPs and the
    embedding `[B, L + 1, D]`, divided by the norm of the unnormalised embedding."""
    v = model.visual
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        x = _vit_input(v, images.double())  # the embedding after ln_pre
        B, M, W = x.shape
        H = blocks[0].attn.num_heads
        d = W // H
        mlps = [x[:, 0]]
        heads = []
        for block in blocks:
            q, k, val = _qkv(block, x)
            w_o = block.attn.out_proj.weight.reshape(W, H, d)
            per_head = []
            for h in range(H):
                s = slice(h * d, (h + 1) * d)
                attn = torch.softmax(q[..., s] / d**0.5 @ k[..., s].transpose(-1, -2), dim=-1)
                mixed = attn[:, 0, :, None] * val[..., s]  # the class query only: [B, M, d]
                post = mixed @ w_o[:, h].T  # [B, M, W]
                per_head.append(post + block.attn.out_proj.bias / (M * H))
            heads.append(torch.stack(per_head, dim=2))  # [B, M, H, W]
            # the block, computed by its branches (the stock block gives the same)
            attn_all = torch.cat(
                [torch.softmax(q[..., h * d:(h + 1) * d] / d**0.5
                               @ k[..., h * d:(h + 1) * d].transpose(-1, -2), -1)
                 @ val[..., h * d:(h + 1) * d] for h in range(H)], -1)  # fmt: skip
            y = x + _out_proj(block, attn_all)
            mlp = block.mlp(_layer_norm(block.ln_2, y))
            mlps.append(mlp[:, 0])
            x = y + mlp
        final = x[:, 0]
        mean = final.mean(-1)[:, None]
        std = (final.var(-1, unbiased=False) + v.ln_post.eps).sqrt()[:, None]
        gamma, beta = v.ln_post.weight, v.ln_post.bias
        heads_t = torch.stack(heads, dim=1)  # [B, L, M, H, W]
        mlps_t = torch.stack(mlps, dim=1)  # [B, L + 1, W]
        K = heads_t.shape[1] + mlps_t.shape[1]
        n = K * M * H
        a = (heads_t - mean[:, None, None, None] / n) * gamma / std[:, None, None, None]
        a = (a + beta / n) @ v.proj
        m = ((mlps_t - mean[:, None] / K) * gamma / std[:, None] + beta / K) @ v.proj
        rep = _layer_norm(v.ln_post, final) @ v.proj
        norm = rep.norm(dim=-1)
    return a / norm[:, None, None, None, None], m / norm[:, None, None], rep / norm[:, None]


def test_reference_entries_sum_to_the_image_embedding(vit_backend):
    """The port is right: all entries add up to the normalised embedding (the logger's
    property), which equals open_clip's own."""
    b = vit_backend
    x = _batch(b)
    m = copy.deepcopy(b.model).double()
    heads, mlps, rep = _prs_decomposition(m, x)
    torch.testing.assert_close(heads.sum(dim=(1, 2, 3)) + mlps.sum(dim=1), rep)
    torch.testing.assert_close(rep, F.normalize(m.encode_image(x.double()), dim=-1))


@pytest.mark.parametrize("layers", [1, 2])
def test_head_maps_are_the_references_spatial_entries_read_by_the_text(vit_backend, layers):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    m = copy.deepcopy(b.model).double()
    heads, _, _ = _prs_decomposition(m, x)  # [B, L, M, H, D]
    last = heads[:, -layers:]  # [B, l, M, H, D]
    per_entry = torch.einsum("blmhd,td->btlhm", last, texts.embeddings.double())
    B, T, L, H, M = per_entry.shape
    expected = per_entry.reshape(B, T, L * H, M)[..., 1:]  # patches: the class source left out
    result = textspan(b, x, texts, layers=layers)
    got = result.extras["head_maps"]
    torch.testing.assert_close(got.flatten(3), expected.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.maps, got.sum(dim=2))
    assert result.labels["heads"][0][:2] == [f"L{2 - layers}.H0", f"L{2 - layers}.H1"]


def test_textspan_sums_the_heads_of_every_block_by_default(tmp_path):
    """The authors' spatial map (demo.ipynb, compute_segmentations.py) sums the entries of
    every layer's heads (`attentions[:, :, 1:].sum(axis=(1, 3))`): here on a tower deeper than
    the 4 last blocks their head descriptions read."""
    import json

    from clipviz.backend import load_backend

    config = json.loads((Path(__file__).parent / "configs" / "tiny-vit.json").read_text())
    config["vision_cfg"]["layers"] = 5
    path = tmp_path / "deep-vit.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    b = load_backend(model_config=path, pretrained="random", device="cpu", text_cache=False)
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    heads, _, _ = _prs_decomposition(copy.deepcopy(b.model).double(), x)  # [B, 5, M, H, D]
    expected = torch.einsum("blmhd,td->btm", heads[:, :, 1:], texts.embeddings.double())
    result = textspan(b, x, texts)
    torch.testing.assert_close(result.maps.flatten(2), expected.float(), atol=1e-5, rtol=1e-4)
    assert result.labels["heads"][0][0] == "L0.H0" and len(result.labels["heads"][0]) == 5 * 3


def test_textspan_needs_a_linear_class_token_head(family_backends):
    b = family_backends("map")
    with pytest.raises(ClipvizError, match="textspan"):
        explain(b, _batch(b), PROMPTS, method="textspan", ensemble=False)


def test_textspan_runs_on_transformers_clip(family_backends):
    b = family_backends("hf-clip")
    e = explain(b, _batch(b), PROMPTS, method="textspan", ensemble=False)
    heads = b.vit.heads
    assert e.extras["head_maps"].shape[:3] == (2, 3, b.vit.depth * heads)
    torch.testing.assert_close(e.maps, e.extras["head_maps"].sum(dim=2))
    assert not torch.allclose(e.extras["head_maps"][:, :, 0], e.extras["head_maps"][:, :, 1])


def test_head_embeddings_are_the_references_spatial_sums(vit_backend):
    from clipviz.methods.textspan import head_embeddings, read_heads

    b = vit_backend
    x = _batch(b, 3)
    m = copy.deepcopy(b.model).double()
    heads, _, _ = _prs_decomposition(m, x)  # [B, L, M, H, D]
    expected = heads.sum(dim=2).flatten(1, 2)  # [B, L·H, D]
    got = head_embeddings(b, read_heads(b, x, 2))
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)


def _iterative_removal(data, text_features, iters, rank):
    """The reference's `replace_with_iterative_removal`, in numpy as released."""
    import numpy as np

    results = []
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    text_features = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(text_features.T).T
    data = torch.from_numpy(data).double()
    data = data - data.mean(dim=0, keepdim=True)
    text_features = torch.from_numpy(text_features).double()
    for _ in range(iters):
        projection = data @ text_features.T
        top_n = int(np.argmax(projection.std(axis=0).numpy()))
        results.append(top_n)
        text_norm = text_features[top_n] @ text_features[top_n]  # `.T` of a vector: a no-op
        data = data - (data @ text_features[top_n] / text_norm)[:, None] * text_features[top_n]
        text_features = (
            text_features
            - (text_features @ text_features[top_n] / text_norm)[:, None] * text_features[top_n]
        )
    return results


@pytest.mark.parametrize(("count", "rank"), [(5, 80), (5, 6)])
def test_text_span_follows_the_iterative_removal(count, rank):
    from clipviz.methods.textspan import text_span

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 16, generator=g, dtype=torch.float64)
    data = torch.randn(40, 4, generator=g, dtype=torch.float64) @ basis  # a rank-4 head
    data += 0.01 * torch.randn(40, 16, generator=g, dtype=torch.float64)
    texts = F.normalize(torch.randn(30, 16, generator=g, dtype=torch.float64), dim=-1)
    chosen, explained = text_span(data, texts, count=count, rank=rank)
    assert chosen == _iterative_removal(data.numpy(), texts.numpy(), count, rank)
    assert len(set(chosen)) == count and 0.0 < explained <= 1.0


def test_text_span_finds_the_texts_a_head_writes():
    """A head whose outputs vary along two bank texts is described by those two first, and
    they explain nearly all of its variance."""
    from clipviz.methods.textspan import text_span

    g = torch.Generator().manual_seed(1)
    texts = F.normalize(torch.randn(50, 32, generator=g, dtype=torch.float64), dim=-1)
    coef = torch.randn(200, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0])
    data = coef @ texts[[7, 23]] + 0.5 * texts[40]  # a constant offset: not variance
    chosen, explained = text_span(data, texts, count=2)
    assert chosen == [7, 23]
    assert explained == pytest.approx(1.0, abs=1e-9)


# -- clipviz heads -------------------------------------------------------------------------


def _cli(args):
    from typer.testing import CliRunner

    from clipviz.cli import app

    return CliRunner().invoke(app, args)


def _model_args(tiny_weights, tower="vit"):
    config, weights = tiny_weights[tower]
    return ["--model-config", str(config), "--pretrained", str(weights)]


@pytest.fixture
def photo_folder(tmp_path):
    from conftest import random_image

    d = tmp_path / "photos"
    d.mkdir()
    for i in range(6):
        random_image(seed=10 + i).save(d / f"p{i}.png")
    (d / "broken.jpg").write_text("not a jpeg")
    return d


def test_heads_describes_every_head_with_the_bank_and_reports_bad_files(
    photo_folder, tmp_path, tiny_weights, vit_backend
):
    import json

    from clipviz.methods.textspan import head_embeddings, read_heads, text_span

    bank = tmp_path / "bank.txt"
    lines = ["a dog", "a red square", "grass", "the sea", "a blue circle", "snow", "a car"]
    bank.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "heads.json"
    result = _cli(["heads", str(photo_folder), "--texts", str(bank), "-l", "2", "-k", "3",
                   "-o", str(out), *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 1, result.output  # one unreadable file, reported
    data = json.loads(out.read_text())
    assert data["images"] == 6 and [Path(f["input"]).name for f in data["failed"]] == ["broken.jpg"]
    assert [h["head"] for h in data["heads"]] == ["L0.H0", "L0.H1", "L0.H2", "L1.H0",
                                                  "L1.H1", "L1.H2"]  # fmt: skip
    # the same selection computed here from the library pieces
    b = vit_backend
    paths = [photo_folder / f"p{i}.png" for i in range(6)]
    x = torch.stack([b.preprocess(Image.open(p).convert("RGB")) for p in paths])
    vectors = head_embeddings(b, read_heads(b, x, 2))
    bank_emb = torch.stack(b.embed_texts(lines, ensemble=False))
    for h, head in enumerate(data["heads"]):
        chosen, explained = text_span(vectors[:, h], bank_emb, 3, 80)
        assert head["texts"] == [lines[i] for i in chosen]
        assert head["explained"] == pytest.approx(explained, abs=1e-4)
    assert "schema_version" in data and data["bank_size"] == len(lines)


def test_heads_usage_errors_are_one_line_with_exit_2(photo_folder, tmp_path, tiny_weights):
    one = tmp_path / "one"
    one.mkdir()
    (photo_folder / "p0.png").rename(one / "p0.png")
    cases = [
        (["heads", str(one)], "at least 2"),
        (["heads", str(photo_folder), "--texts", str(tmp_path / "missing.txt")], "does not exist"),
        (["heads", str(photo_folder), "-l", "5"], "exceeds the 2 blocks"),
        (["heads", str(photo_folder), "-k", "0"], "at least 1"),
    ]
    for args, message in cases:
        result = _cli([*args, *_model_args(tiny_weights)])
        assert result.exit_code == 2, result.output
        assert message in result.output
    map_model = _cli(["heads", str(photo_folder), *_model_args(tiny_weights, "map")])
    assert map_model.exit_code == 2 and "textspan is not defined" in map_model.output
