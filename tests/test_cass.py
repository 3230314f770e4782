"""CASS against a step-by-step computation of its authors' code (MICV-yonsei/CASS
`VisionTransformer.forward`, `custom_attn` with arch 'reduced' and attn_strategy 'spectral',
`DinoSelfAttention.forward`, `cass_segmentor.py` `forward_feature`, `hierarchical_prompt`) on
float64 copies of a four-block tiny CLIP ViT and a tiny random timm ViT/8 as the proxy, one
image at a time, head by head; the assignment and Ward's clustering that the reference takes
from scipy against direct computations."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import random_image
from PIL import Image
from reference import _layer_norm, _out_proj, _qkv, _texts, _vit_input
from safetensors.torch import save_file
from test_proxy import write_proxy_folder
from test_scclip import _images, deep_vit  # noqa: F401 (a fixture)

from clipviz.methods.cass import (
    INVERSE_MEAN,
    INVERSE_STD,
    cass,
    cass_maps,
    key_groups,
    min_cost_assignment,
    proxy_input,
    ward_clusters,
)
from clipviz.segment import Protocol, Segmenter, get_preset, inline_classes
from clipviz.segment.presets import preset_options
from clipviz.segment.proxy import load_proxy

PROMPTS = ["a dog", "a red square", "grass", "a cat"]
H = W = 6  # the deep ViT's patch grid (96 px, patch 16)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# a DINO-like ViT/8 as wide as the deep ViT (3 heads of 16), trained size 96: a 12x12 grid
PROXY = ("vit_small_patch8_224", {"depth": 2, "embed_dim": 48, "num_heads": 3, "img_size": 96})

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def proxy_folder(tmp_path_factory):
    """A folder as the hub gives a timm model, holding a tiny random ViT/8; (folder, model)."""
    root = tmp_path_factory.mktemp("cass-proxy")
    architecture, args = PROXY
    torch.manual_seed(3)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **args).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "model.safetensors"))  # fmt: skip
    config = {"architecture": architecture, "model_args": args,
              "pretrained_cfg": {"mean": IMAGENET[0], "std": IMAGENET[1]}}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    return root, model


# -- the reference, written out --------------------------------------------------------------


def _heads(t, heads):
    return t[0].view(t.shape[1], heads, -1).transpose(0, 1)  # [heads, L, d]


def _dino_keys(model, image):
    """DinoSelfAttention.forward on forward_feature's inverse-normalised uint8 window (square:
    no resize): ToTensor, ImageNet normalisation, the last block's keys `[heads, T, d]`."""
    mean, std = torch.tensor(INVERSE_MEAN), torch.tensor(INVERSE_STD)
    pixels = (image.permute(1, 2, 0) * std + mean).numpy() * 255
    pil = Image.fromarray(pixels.astype("uint8"))
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).double() / 255
    x = (x - torch.tensor(IMAGENET[0])[:, None, None]) / torch.tensor(IMAGENET[1])[:, None, None]
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        tokens = m._pos_embed(m.patch_embed(x[None]))  # the trained size: positions as they are
        for block in m.blocks[:-1]:
            tokens = block(tokens)
        last = m.blocks[-1]
        qkv = last.attn.qkv(last.norm1(tokens))
        heads = last.attn.num_heads
        qkv = qkv.reshape(1, tokens.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[1][0]


def _gaussian_addition(std):
    """get_attention_addition: a (2H-1)x(2W-1) Gaussian window convolved over one-hot maps."""
    c = 1 / (std * math.sqrt(2))
    ks = [torch.linspace(-(n - 1) * c, (n - 1) * c, 2 * n - 1, dtype=torch.float64) for n in (H, W)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    eye = torch.einsum("ij,kl->ijkl", torch.eye(H), torch.eye(W)).permute(0, 3, 1, 2)
    out = F.conv2d(eye.reshape(-1, 1, H, W).double(), window[None, None], padding="same")
    return out.reshape(H * W, H * W)


def _spectral(k, dk, scale, stretch):
    """_apply_spectral_strategy, head by head, the assignment by trying every pairing."""
    heads = k.shape[0]
    clip = k @ k.transpose(1, 2) * scale
    dino = dk @ dk.transpose(1, 2) * scale

    def spectrum(a):
        vals = torch.sort(torch.linalg.eigvalsh(a), descending=True)[0][:20]
        return vals / vals.norm()

    d_eig = [spectrum(a) for a in dino]
    c_eig = [spectrum(a) for a in clip]
    cost = torch.zeros(heads, heads, dtype=torch.float64)
    for i in range(heads):
        for j in range(heads):
            p, q = d_eig[i] / d_eig[i].abs().sum(), c_eig[j] / c_eig[j].abs().sum()
            cost[i, j] = 1 - (p.sort()[0] - q.sort()[0]).abs().sum()
    col = _cheapest(cost.numpy())
    out = torch.zeros_like(clip)
    for i in range(heads):
        j = col[i]
        w_d = 1 - cost[i, j]
        u, s, vh = torch.linalg.svd(dino[j])  # svd_lowrank(q=10)'s triplets, exactly
        u, s, v = u[:, :10], s[:10], vh[:10].T
        if stretch:
            lo, hi = s.min(), s.max()
            s = (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo
        approx = u @ torch.diag(s) @ v.T
        approx.fill_diagonal_(0)
        t = clip[i]
        approx = (approx - approx.min()) / (approx.max() - approx.min()) * (t.max() - t.min())
        approx = approx + t.min()
        out[i] = (w_d * 10 * approx + t) / (w_d * 10 + 1)
    return out


def _clusters_at_closest_pair(text):
    """Ward's clusters cut at the smallest cosine distance: that pair together, the rest alone."""
    d = 1 - text @ text.T
    d.fill_diagonal_(math.inf)
    a, b = divmod(int(d.argmin()), len(text))
    return [[a, b]] + [[i] for i in range(len(text)) if i not in (a, b)], float(d[a, b])


def _cass_reference(backend, proxy_model, image, texts, o, clusters):
    m = copy.deepcopy(backend.model).double()
    vis = m.visual
    blocks = list(vis.transformer.resblocks)
    heads = blocks[0].attn.num_heads
    with torch.no_grad():
        x = _vit_input(vis, image[None].double())
        for block in blocks[:-1]:
            q, k, v = (_heads(t, heads) for t in _qkv(block, x))
            probs = torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
            x = x + _out_proj(block, (probs @ v).transpose(0, 1).reshape(1, x.shape[1], -1))
            x = x + block.mlp(_layer_norm(block.ln_2, x))
        last = blocks[-1]
        q, k, v = (_heads(t, heads) for t in _qkv(last, x))
        probs = torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
        y = x + _out_proj(last, (probs @ v).transpose(0, 1).reshape(1, x.shape[1], -1))
        y = y + last.mlp(_layer_norm(last.ln_2, y))
        x_last = F.normalize(_layer_norm(vis.ln_post, y[:, 0]) @ vis.proj, dim=-1)[0]
        k, v = k[:, 1:], v[:, 1:]
        # the DINO keys: [heads, d, N_dino] -> CLIP's grid -> [heads, N, d], in k's range
        dk = _dino_keys(proxy_model, image)[:, 1:].permute(0, 2, 1)
        dk = dk.reshape(heads, -1, 12, 12)
        dk = F.interpolate(dk, size=(H, W), mode="bilinear", align_corners=False)
        dk = dk.reshape(heads, -1, H * W).permute(0, 2, 1)
        dk = (dk - dk.min()) / (dk.max() - dk.min()) * (k.max() - k.min()) + k.min()
        scale = k.shape[-1] ** -0.5
        attn = _spectral(k, dk, scale, o["stretch"]) + _gaussian_addition(o["std"])
        out = _out_proj(last, (attn.softmax(-1) @ v).transpose(0, 1).reshape(1, H * W, -1))[0]
        feats = F.normalize(_layer_norm(vis.ln_post, out) @ vis.proj, dim=-1)  # [N, D]
        text = texts.embeddings.double()
        sim = x_last @ text.T
        adjusted = text.clone()
        for members in clusters:
            best = members[int(torch.argmax(sim[members]))]
            top = torch.topk(feats @ text[best], 2).indices
            mean = F.normalize(feats[top].mean(0), dim=0)
            w = o["mean_vector_weight"]
            adjusted[best] = F.normalize((1 - w) * text[best] + w * mean, dim=0)
        g = o["global_semantics_weight"]
        logits = (feats @ adjusted.T) * (1 - g) + sim[None] * g
        return logits.T.reshape(-1, H, W)


DEFAULTS = {"global_semantics_weight": 0.25, "mean_vector_weight": 0.04, "std": 5.0,
            "stretch": True}  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{}, {"global_semantics_weight": 0.4, "mean_vector_weight": 0.3, "std": 2.0, "stretch": False}],
)
def test_cass_equals_its_authors_forward_step_by_step(deep_vit, proxy_folder, options):  # noqa: F811
    folder, proxy_model = proxy_folder
    b = deep_vit
    x = _images(b)
    texts = _texts(b, PROMPTS)
    clusters, threshold = _clusters_at_closest_pair(texts.embeddings.double())
    settings = {**DEFAULTS, **options}
    result = cass(b, x, texts, proxy=str(folder), h_threshold=threshold + 1e-6, **options)
    for i in range(len(x)):
        expected = _cass_reference(b, proxy_model, x[i], texts, settings, clusters)
        torch.testing.assert_close(result.maps[i], expected.float(), atol=1e-5, rtol=1e-5)


# -- scipy's pieces ----------------------------------------------------------------------------


def _cheapest(cost):
    """The first permutation in order whose total cost is within 1e-6 of the least."""
    n = len(cost)
    totals = {s: cost[range(n), s].sum() for s in itertools.permutations(range(n))}
    least = min(totals.values())
    return next(s for s, total in totals.items() if total <= least + 1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_min_cost_assignment_is_the_cheapest_permutation(seed):
    rng = np.random.default_rng(seed)
    cost = rng.normal(size=(6, 6))
    assert min_cost_assignment(cost).tolist() == list(_cheapest(cost))
    # rows that differ by a constant tie every pairing of theirs: the first in order wins,
    # whatever the float noise
    tied = cost.copy()
    tied[[1, 3, 4]] = cost[1] + np.array([[0.0], [0.25], [-0.5]]) + rng.normal(0, 1e-14, (3, 6))
    expected = _cheapest(tied)
    assert min_cost_assignment(tied).tolist() == list(expected)
    assert expected[1] < expected[3] < expected[4]


def _ward_from_centroids(points, threshold):
    """Agglomerative Ward written from its definition on Euclidean points: merge the pair of
    clusters with the smallest sqrt(2 |u||v| / (|u|+|v|)) · |c_u − c_v| while it is at most
    `threshold`; the clusters as a set of frozensets."""
    clusters = [[i] for i in range(len(points))]
    while len(clusters) > 1:

        def cost(pair):
            u, v = (clusters[i] for i in pair)
            gap = points[u].mean(0) - points[v].mean(0)
            return math.sqrt(2 * len(u) * len(v) / (len(u) + len(v))) * np.linalg.norm(gap)

        a, b = min(itertools.combinations(range(len(clusters)), 2), key=cost)
        if cost((a, b)) > threshold:
            break
        clusters[a] += clusters.pop(b)
    return {frozenset(c) for c in clusters}


@pytest.mark.parametrize("threshold", [0.0, 0.6, 1.0, 1.6, 3.0, 100.0])
def test_ward_clusters_are_wards_merges_cut_at_the_threshold(threshold):
    points = np.random.default_rng(5).normal(size=(9, 3))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    labels = ward_clusters(distances, threshold)
    found = {frozenset(np.flatnonzero(labels == c).tolist()) for c in set(labels.tolist())}
    assert found == _ward_from_centroids(points, threshold)


def test_the_proxy_sees_a_wide_window_squashed_to_its_short_side_as_pil_resizes_it(proxy_folder):
    proxy = load_proxy(str(proxy_folder[0]))
    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 36, 69))) / 255
    window = (rgb - torch.tensor(CLIP[0]).view(3, 1, 1)) / torch.tensor(CLIP[1]).view(3, 1, 1)
    got = proxy_input(window, proxy, 36)
    assert got.shape == (1, 3, 32, 32)  # a 36-pixel square, cut to whole 8-pixel patches
    mean, std = torch.tensor(INVERSE_MEAN), torch.tensor(INVERSE_STD)
    pixels = ((window[0].permute(1, 2, 0) * std + mean) * 255).numpy().astype("uint8")
    pil = np.asarray(Image.fromarray(pixels).resize((36, 36)))[:32, :32]  # bicubic
    seen = (got[0].permute(1, 2, 0) * torch.tensor(IMAGENET[1]) + torch.tensor(IMAGENET[0])) * 255
    difference = (seen - torch.from_numpy(pil.astype("float32"))).abs()
    assert float(difference.max()) <= 1.0 + 1e-3 and float(difference.mean()) < 0.1


# -- in the segmentation protocol ----------------------------------------------------------------

# OVSEG.md §1.2-1.4 for CASS (short side, window / stride, prob_thd; logit scale 40, no area
# threshold, PAMR off as eval_all.sh runs it) and each configs/cfg_<benchmark>.py's options
CASS_PRESETS = {
    "voc21": (336, 0, 0, 0.1, {"global_semantics_weight": 0.1, "mean_vector_weight": 0.03,
                               "h_threshold": 0.10}),
    "context60": (336, 224, 112, 0.1, {"global_semantics_weight": 0.25,
                                       "mean_vector_weight": 0.04, "h_threshold": 0.09}),
    "coco_object": (336, 224, 112, 0.1, {"global_semantics_weight": 0.25,
                                         "mean_vector_weight": 0.01, "h_threshold": 0.10}),
    "voc20": (336, 224, 112, 0.0, {"global_semantics_weight": 0.4, "mean_vector_weight": 0.02,
                                   "h_threshold": 0.10, "stretch": False}),
    "context59": (336, 224, 112, 0.0, {"global_semantics_weight": 0.25,
                                       "mean_vector_weight": 0.04, "h_threshold": 0.09}),
    "coco_stuff164k": (336, 224, 112, 0.0, {"global_semantics_weight": 0.2,
                                            "mean_vector_weight": 0.02, "h_threshold": 0.02}),
    "cityscapes": (560, 224, 112, 0.0, {"global_semantics_weight": 0.1,
                                        "mean_vector_weight": 0.03, "h_threshold": 0.14,
                                        "stretch": False, "whole_image": False}),
    "ade20k": (336, 224, 112, 0.0, {"global_semantics_weight": 0.3, "mean_vector_weight": 0.05,
                                    "h_threshold": 0.06}),
}  # fmt: skip


@pytest.mark.parametrize("benchmark", list(CASS_PRESETS))
def test_cass_presets_carry_the_authors_settings_and_options(benchmark):
    short_side, window, stride, prob_thd, options = CASS_PRESETS[benchmark]
    preset = get_preset(f"cass/{benchmark}")
    assert preset.method == "cass" and preset.options == options
    p = preset.protocol
    assert (p.short_side, p.window, p.stride, p.prob_thd) == (short_side, window, stride, prob_thd)
    assert (p.logit_scale, p.area_thd, p.pamr_steps) == (40.0, 0.0, 0)
    assert preset_options(preset, "cass") == options  # checked as -O options are
    assert preset_options(preset, "naclip") == {}  # another method's run: its own defaults
    assert get_preset(benchmark, method="cass") == preset


def test_list_presets_shows_the_cass_presets_options():
    from typer.testing import CliRunner

    from clipviz.cli import app

    result = CliRunner().invoke(app, ["segment", "--list-presets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["presets"]}
    assert {b: rows[f"cass/{b}"]["options"] for b in CASS_PRESETS} == {
        b: row[-1] for b, row in CASS_PRESETS.items()
    }
    assert rows["sclip/voc21"]["options"] == {}


def test_segment_scores_each_window_with_its_whole_images_embedding(deep_vit, proxy_folder):  # noqa: F811
    folder = str(proxy_folder[0])
    names = inline_classes("a dog,a red square,grass")
    protocol = Protocol(short_side=0, window=64, stride=48)
    image = random_image(seed=4, size=(112, 64))  # two 64x64 windows
    segmenter = Segmenter(deep_vit, names, "cass", protocol, {"proxy": folder})
    prepared = segmenter.prepare(image)
    maps, failed = segmenter.window_maps([prepared])
    assert not failed and len(prepared.windows) == 2
    whole = deep_vit.image_embeddings(prepared.image[None])
    proxy = load_proxy(folder)
    for j, w in enumerate(prepared.windows):
        crop = prepared.image[None, :, w.top : w.top + 64, w.left : w.left + 64]
        expected = cass_maps(deep_vit, crop, segmenter.texts, proxy, whole).maps[0]
        torch.testing.assert_close(maps[(0, j)], expected, atol=1e-5, rtol=1e-5)
        own = cass(deep_vit, crop, segmenter.texts, proxy=folder).maps[0]
        assert not torch.allclose(maps[(0, j)], own, atol=1e-3)
    # whole_image off: each window's own embedding, as the reference on Cityscapes
    alone = Segmenter(deep_vit, names, "cass", protocol, {"proxy": folder, "whole_image": False})
    maps, _ = alone.window_maps([prepared])
    for j, w in enumerate(prepared.windows):
        crop = prepared.image[None, :, w.top : w.top + 64, w.left : w.left + 64]
        own = cass(deep_vit, crop, segmenter.texts, proxy=folder).maps[0]
        torch.testing.assert_close(maps[(0, j)], own, atol=1e-5, rtol=1e-5)


def test_clipviz_segment_runs_cass_with_a_proxy_folder_and_the_presets_options(
    tmp_path, trained_clip
):
    from typer.testing import CliRunner

    from clipviz.backend import load_backend
    from clipviz.cli import app
    from clipviz.segment import read_classes_file
    from clipviz.testbed.world import write_voc

    config, weights = trained_clip
    write_voc(tmp_path / "voc", 2, seed=11, size=64)
    architecture, args = PROXY[0], {**PROXY[1], "embed_dim": 64, "num_heads": 4, "img_size": 64}
    folder = tmp_path / "proxy"  # a random ViT/8 as wide as the test bed's CLIP
    folder.mkdir()
    torch.manual_seed(3)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text(
        json.dumps({"architecture": architecture, "model_args": args})
    )
    classes, out = tmp_path / "voc" / "classes.txt", tmp_path / "out"
    result = CliRunner().invoke(app, [
        "segment", str(tmp_path / "voc" / "JPEGImages"), "--classes-file", str(classes),
        "--preset", "cass/voc20", "--proxy", str(folder), "--short-side", "64", "--window", "48",
        "--stride", "16", "--model-config", str(config), "--pretrained", str(weights),
        "--device", "cpu", "--workers", "0", "--save-probs", "--out", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    preset = get_preset("cass/voc20")
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "cass" and run["options"] == {**preset.options, "proxy": str(folder)}
    # the library, with the preset's options and without them
    backend = load_backend(model_config=config, pretrained=str(weights), device="cpu")
    protocol = preset.with_overrides(short_side=64, window=48, stride=16)
    names = read_classes_file(classes)
    tuned = Segmenter(backend, names, "cass", protocol, {**preset.options, "proxy": str(folder)})
    plain = Segmenter(backend, names, "cass", protocol, {"proxy": str(folder)})
    photos = sorted((tmp_path / "voc" / "JPEGImages").iterdir())
    images = [Image.open(p).convert("RGB") for p in photos]
    pairs = zip(photos, tuned(images, keep_probs=True), plain(images, keep_probs=True), strict=True)
    for photo, seg, other in pairs:
        assert np.array_equal(np.asarray(Image.open(out / photo.name / "labels.png")), seg.labels)
        stored = torch.from_numpy(np.load(out / photo.name / "probs.npz")["probs"]).float()
        torch.testing.assert_close(stored, seg.probs, atol=1e-3, rtol=0)  # float16 on file
        assert (stored - other.probs).abs().max() > 0.05  # the preset's options change them


def test_clipviz_eval_segment_runs_cass_with_the_presets_options(tmp_path, tiny_weights):
    from typer.testing import CliRunner

    from clipviz.cli import app
    from clipviz.testbed.world import write_voc

    write_voc(tmp_path / "voc", 1, seed=5, size=64)
    config, weights = tiny_weights["vit"]
    folder, out = tmp_path / "proxy", tmp_path / "r.json"
    write_proxy_folder(folder)
    result = CliRunner().invoke(app, [
        "eval", str(tmp_path / "voc"), "--task", "segment", "--preset", "cass/cityscapes",
        "-O", "proxy=" + str(folder), "-O", "h_threshold=0.3", "--short-side", "0",
        "--window", "48", "--stride", "16", "--json", str(out), "--model-config", str(config),
        "--pretrained", str(weights), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    options = json.loads(out.read_text())["method_options"]
    preset = get_preset("cass/cityscapes").options
    assert options == {"cass": {**preset, "h_threshold": 0.3, "proxy": str(folder)}}


def test_proxy_channels_are_shared_out_to_clips_heads_in_order():
    keys = torch.arange(2 * 5 * 3, dtype=torch.float64).view(2, 5, 3)  # [B, C, N]
    even = key_groups(keys[:, :4], 2)  # 4 channels, 2 heads: the reference's reshape
    torch.testing.assert_close(even, keys[:, :4].reshape(2, 2, 2, 3).transpose(-2, -1))
    uneven = key_groups(keys, 2)  # 5 channels: 3 and 2, the second padded with a zero channel
    assert uneven.shape == (2, 2, 3, 3)
    torch.testing.assert_close(uneven[:, 0], keys[:, :3].transpose(1, 2))
    torch.testing.assert_close(uneven[:, 1, :, :2], keys[:, 3:].transpose(1, 2))
    assert not uneven[:, 1, :, 2].any()


def test_bench_leaves_cass_out_unless_named():
    from clipviz.runs.bench import default_methods

    assert "cass" not in default_methods() and "naclip" in default_methods()
