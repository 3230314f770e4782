"""ConVis on a tiny ViT with real WordNet: window geometry, rank tables, accumulation and
inversion, the batched pass against a one-window-at-a-time loop, AUROC, the method and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image, single_thread, write_cub
from PIL import Image
from typer.testing import CliRunner

from clipviz.backend import Preprocess
from clipviz.cli import app
from clipviz.convis.bank import ConceptBank, concept_bank
from clipviz.convis.hierarchy import Hierarchy
from clipviz.convis.maps import concept_map, dense_maps, grid_maps, rank_map, stochastic_maps
from clipviz.convis.ood import auroc
from clipviz.convis.ranks import synset_ranks, window_ranks
from clipviz.convis.windows import (
    CANVAS,
    canvas_tensor,
    noise_canvas,
    square_from_batch,
    square_image,
    window_batch,
    window_boxes,
)
from clipviz.errors import ClipvizError
from clipviz.methods.convis import convis, text_concepts
from clipviz.render import load_npz

runner = CliRunner()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("dog\nwolf\ncat\ncircle\nsquare\ncar\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def bank(vit_backend, vocab):
    return concept_bank(vit_backend, vocab)


def _model_args(tiny_weights):
    config, weights = tiny_weights["vit"]
    return ["--model-config", str(config), "--pretrained", str(weights)]


def test_windows_are_900_per_size_and_cover_the_canvas():
    boxes = window_boxes()
    assert boxes.shape == (1800, 4) and CANVAS == 480
    for size, part in ((128, boxes[:900]), (64, boxes[900:])):
        assert sorted(set(part[:, 0].tolist())) == list(range(0, 480, 16))
        assert (part[:, 2] - part[:, 0] == np.minimum(size, 480 - part[:, 0])).all()  # clipped
        assert (part[:, 3] - part[:, 1] == np.minimum(size, 480 - part[:, 1])).all()
    coverage = np.zeros((480, 480), dtype=int)
    for t, left, b, r in boxes:
        coverage[t:b, left:r] += 1
    assert coverage[0, 0] == 2  # one window of each size
    assert coverage[240, 240] == coverage[479, 479] == 8 * 8 + 4 * 4
    assert coverage.min() == 2


def test_noise_canvas_is_the_seeded_noise_with_the_image_in_the_middle():
    square = np.full((224, 224, 3), 7, dtype=np.uint8)
    canvas = noise_canvas(square, seed=3)
    noise = np.random.default_rng(3).integers(0, 256, (480, 480, 3), dtype=np.uint8)
    assert (canvas[:128] == noise[:128]).all() and (canvas[:, 352:] == noise[:, 352:]).all()
    assert (canvas[128:352, 128:352] == 7).all()


def test_accumulation_and_inversion_match_the_definition():
    boxes = window_boxes()
    ranks = torch.from_numpy(np.random.default_rng(0).integers(0, 500, (1800, 2)))
    acc = np.zeros((2, 480, 480))
    for (t, left, b, r), row in zip(boxes, ranks.numpy(), strict=True):
        acc[:, t:b, left:r] += row[:, None, None]
    inner = acc[:, 128:352, 128:352]
    lo, hi = inner.min(axis=(1, 2), keepdims=True), inner.max(axis=(1, 2), keepdims=True)
    expected = 1 - (inner - lo) / (hi - lo)  # M = 1 − norm(A)
    np.testing.assert_allclose(rank_map(boxes, ranks).numpy(), expected, atol=1e-6)
    # windows inside the canvas square [192, 272)² rank 0, all others 100: the map peaks there
    lo_, hi_ = 192, 272
    inside = (boxes[:, :2] >= lo_).all(axis=1) & (boxes[:, 2:] <= hi_).all(axis=1)
    m = rank_map(boxes, torch.from_numpy(np.where(inside, 0, 100))[:, None])[0]
    y, x = np.unravel_index(int(m.argmax()), m.shape)
    assert lo_ - 128 <= y < hi_ - 128 and lo_ - 128 <= x < hi_ - 128 and m.max() == 1


def test_ranks_are_competition_ranks_and_a_subtree_takes_its_best_member():
    # a -> b, a -> c, c -> d; t_u = e_u, so a window's similarities are its coordinates
    h = Hierarchy(
        "toy", (), ("a", "b", "c", "d"), np.arange(4), np.arange(4),
        np.array([0, 0, 2]), np.array([1, 2, 3]),
    )  # fmt: skip
    toy = ConceptBank(h, "definitions", torch.eye(4))
    windows = torch.tensor([[0.1, 0.4, 0.3, 0.9], [0.5, 0.5, 0.2, 0.1]])
    assert synset_ranks(windows, torch.eye(4)).tolist() == [[3, 1, 2, 0], [0, 0, 2, 3]]
    assert window_ranks(windows, toy, [0, 1, 2, 3]).tolist() == [[0, 1, 0, 0], [0, 0, 2, 3]]


def test_batched_pass_equals_one_window_at_a_time(vit_backend, bank):
    backend, h = vit_backend, bank.hierarchy
    square = np.asarray(square_image(random_image(0)))
    concepts = [h.index(n) for n in ("canine.n.02", "dog.n.01", "cat.n.01", "entity.n.01")]
    maps, table, _ = grid_maps(backend, square, bank, concepts, seed=0, batch_size=200)
    canvas, boxes = noise_canvas(square, seed=0), window_boxes()
    # the reference loop: one window per forward pass, every synset ranked, minimum by hand
    x = canvas_tensor(backend, canvas)
    with single_thread():
        for k in range(0, len(boxes), 11):
            v = backend.image_embeddings(window_batch(x, boxes[k : k + 1], backend))
            sims = (v @ bank.embeddings.T)[0]
            rank = [int((sims > s).sum()) for s in sims]
            for j, c in enumerate(concepts):
                assert table[k, j] == min(rank[u] for u in h.subtree(c))
    assert (table[:, 3] == 0).all()  # entity's subtree holds every window's best synset
    acc = np.zeros((len(concepts), 480, 480))
    for (t, left, b, r), row in zip(boxes, table.numpy(), strict=True):
        acc[:, t:b, left:r] += row[:, None, None]
    inner = acc[:, 128:352, 128:352]
    lo, hi = inner.min(axis=(1, 2), keepdims=True), inner.max(axis=(1, 2), keepdims=True)
    expected = 1 - (inner - lo) / np.maximum(hi - lo, 1e-12)
    np.testing.assert_allclose(maps.numpy(), expected, atol=1e-6)


def test_windows_go_through_the_eval_transform(vit_backend):
    canvas = noise_canvas(np.asarray(square_image(random_image(1))), seed=0)
    boxes = window_boxes()[[0, 400, 29, 870, 929, 1799]]  # inside, clipped 128×16, 16×128, …
    batched = window_batch(canvas_tensor(vit_backend, canvas), boxes, vit_backend)
    pre = vit_backend.preprocess
    eval_transform = Preprocess(pre.size, pre.mean, pre.std, crop="center")
    image = Image.fromarray(canvas)
    for k, (t, left, b, r) in enumerate(boxes.tolist()):
        reference = eval_transform(image.crop((left, t, r, b)))
        levels = (batched[k] - reference).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255
        assert levels.mean() < 1.0  # torch's bicubic vs PIL's, both rounded to 8 bits


def test_auroc_counts_ties_as_half():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5
    assert auroc([0.9, 0.5], [0.5, 0.1]) == 3.5 / 4
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40), rng.integers(0, 5, 30)
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(pos, neg) == pytest.approx(pairs)
    with pytest.raises(ClipvizError):
        auroc([], [1.0])


def test_dense_variant_and_the_method_function(vit_backend, bank, vocab):
    backend = vit_backend
    assert text_concepts(["dog.n.01", "cat", "wolves"]) == ["dog.n.01", "cat.n.01", "wolf.n.01"]
    assert text_concepts(["x", "y"], synsets="wolf.n.01, dog.n.01") == ["wolf.n.01", "dog.n.01"]
    with pytest.raises(ClipvizError, match="one per text"):
        text_concepts(["x"], synsets=["wolf.n.01", "dog.n.01"])
    images = torch.stack([backend.preprocess(random_image(i)) for i in range(2)])
    texts = backend.encode_texts(["dog.n.01", "cat"], ensemble=False)
    maps = convis(backend, images, texts, variant="dense", vocabulary=vocab).maps
    assert maps.shape == (2, 2, 4, 4)
    idx = [bank.hierarchy.index("dog.n.01"), bank.hierarchy.index("cat.n.01")]
    tokens = backend.dense_tokens(images)[:, 1:].reshape(-1, 32)
    expected = -window_ranks(tokens, bank, idx).float().view(2, 4, 4, 2).permute(0, 3, 1, 2)
    assert torch.equal(maps, expected) and torch.equal(dense_maps(backend, images, bank, idx), maps)
    m = concept_map(backend, random_image(0), "dog.n.01", variant="dense", vocabulary=vocab)
    assert m.shape == (224, 224) and 0 <= m.min() < 0.2 and 0.8 < m.max() <= 1
    squares = square_from_batch(backend, images)  # what the method sees through `explain`
    assert squares.shape == (2, 224, 224, 3) and squares.dtype == np.uint8


def test_stochastic_variant_is_seeded(vit_backend, bank):
    square = np.asarray(square_image(random_image(0)))
    concepts = [bank.hierarchy.index("dog.n.01"), bank.hierarchy.index("circle.n.01")]
    with single_thread():
        a, b, c = (
            stochastic_maps(vit_backend, square, bank, concepts, seed=s, iterations=20, restart=5)
            for s in (0, 0, 1)
        )
    assert a.shape == (2, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0


def test_concepts_cli_writes_maps_manifest_and_discoveries(tmp_path, tiny_weights, vocab):
    random_image(0).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    args = ["concepts", str(tmp_path / "photo.png"), "--synset", "dog.n.01", "--top", "2"]
    args += ["--vocabulary", vocab, "--out", str(out), *_model_args(tiny_weights)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (rec,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok" and rec["crop"] == [8, 0, 88, 80]
    concepts = rec["concepts"]
    assert concepts[0]["synset"] == "dog.n.01" and not concepts[0]["discovered"]
    assert len(concepts) == 3 and all(c["discovered"] for c in concepts[1:])
    assert all(isinstance(c["best_rank"], int) for c in concepts)
    assert (out / "photo.png" / "dog-n-01.overlay.png").is_file()
    npz = load_npz(out / "photo.png" / "maps.npz")
    assert npz["maps"].shape == (3, 224, 224) and npz["upsampled"].shape == (3, 80, 80)
    assert list(npz["prompts"]) == [c["synset"] for c in concepts]


def test_concepts_cli_unknown_synset_exits_2_with_suggestions(tmp_path):
    random_image(0).save(tmp_path / "photo.png")
    result = runner.invoke(app, ["concepts", str(tmp_path / "photo.png"), "-s", "elefant.n.01"])
    assert result.exit_code == 2
    assert "unknown synset 'elefant.n.01'" in result.output and "elephant.n.01" in result.output
    assert "--word NOUN uses a noun's first sense and lists its others" in result.output
    assert "Traceback" not in result.output


def test_concepts_ood_cli_reports_both_aurocs(tmp_path, tiny_weights):
    for name, seeds in (("in", (0, 1, 2)), ("out", (3, 4))):
        (tmp_path / name).mkdir()
        for s in seeds:
            random_image(s).save(tmp_path / name / f"{s}.png")
    report = tmp_path / "ood.json"
    args = ["concepts-ood", "--in-synset", "canine.n.02", "--id-images", str(tmp_path / "in")]
    args += ["--ood-images", str(tmp_path / "out"), "--json", str(report)]
    result = runner.invoke(app, args + _model_args(tiny_weights))
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output and "hierarchy" in result.output
    data = json.loads(report.read_text())
    assert data["id_images"] == 3 and data["ood_images"] == 2 and data["leaves"] > 50
    assert 0 <= data["auroc_hierarchy"] <= 1 and 0 <= data["auroc_single"] <= 1


def test_eval_scores_convis_boxes_on_cub_layout(tmp_path, tiny_weights):
    root = write_cub(tmp_path / "cub")
    out = tmp_path / "res.json"
    result = runner.invoke(
        app,
        ["eval", str(root), "--format", "cub", "--method", "convis", "--synset", "bird.n.01",
         "--metric", "maxboxacc", "--json", str(out), *_model_args(tiny_weights)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())["results"]["convis"]
    # the second image's box is the whole image: a low threshold always finds it
    assert res["pairs"] == 2 and res["maxboxacc"] >= 50.0
