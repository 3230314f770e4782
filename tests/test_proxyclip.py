"""ProxyCLIP against a step-by-step computation of its authors' code (mc-lan/ProxyCLIP
`proxyclip_segmentor.py::forward_feature`, `forward_slide`'s padding, and
`open_clip/transformer.py::custom_attn`) on a float64 copy of the tiny ViT, with a tiny random
timm ViT/8 as the proxy, one image at a time (the reference handles one)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from PIL import Image
from reference import _layer_norm, _out_proj, _texts
from test_proxy import write_proxy_folder
from typer.testing import CliRunner

from clipviz.backend import hub
from clipviz.cli import app
from clipviz.methods.proxyclip import proxy_attention, proxyclip
from clipviz.segment import ClassNames, Segmenter, get_preset
from clipviz.testbed.world import make_scene, write_voc

PROMPTS = ["a dog", "a red square", "grass"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def proxy_folder(tmp_path_factory):
    """A tiny DINO-like ViT/8 trained (at random) at 112 pixels: a 14×14 grid, so that its
    reference forward is timm's own at that size."""
    root = tmp_path_factory.mktemp("proxyclip")
    folder, model = write_proxy_folder(root / "proxy", "dino", seed=3, img_size=112)
    return folder, model


def _clip_input(backend, size):
    """Images of `size` (h, w) normalised with CLIP's mean/std."""
    mean = torch.tensor(backend.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(backend.preprocess.std).view(3, 1, 1)
    out = []
    for seed in (0, 1):
        pixels = torch.from_numpy(np.array(random_image(seed, (size[1], size[0]))))
        pixels = pixels.permute(2, 0, 1).float() / 255
        out.append((pixels - mean) / std)
    return torch.stack(out)


def _reference(backend, proxy_model, image, texts, beta=1.2, gamma=3.0, pad=False):
    """The authors' forward on one CLIP-normalised image `[3, H, W]`, written out: cosine
    maps on the proxy's grid, or with `pad` (forward_slide) at the image's pixels. (For
    images that are not square the authors' reshapes swap height and width; here they do
    not.)"""
    clip = copy.deepcopy(backend.model).double()
    vis = clip.visual
    proxy = copy.deepcopy(proxy_model).double()
    mean, std = backend.preprocess.mean, backend.preprocess.std
    with torch.no_grad():
        # forward_slide: zero-pad to a multiple of 56, centred (compute_padsize)
        H, W = image.shape[-2:]
        lr, tb = ((56 - W % 56) % 56, (56 - H % 56) % 56) if pad else (0, 0)
        left, top = lr // 2, tb // 2
        img = F.pad(image[None].double(), (left, lr - left, top, tb - top))
        # UnNormalize(CLIP) then Normalize(ImageNet), per channel
        pix = torch.stack([img[0, c] * std[c] + mean[c] for c in range(3)])
        norm = torch.stack([(pix[c] - IMAGENET[0][c]) / IMAGENET[1][c] for c in range(3)])
        # DINO's prepare_tokens (positions: bicubic at the scale (grid + 0.1) / 14), blocks,
        # and get_intermediate_layers(n=1)'s final norm
        rows, cols = norm.shape[-2] // 8, norm.shape[-1] // 8
        patches = proxy.patch_embed.proj(norm[None]).flatten(2).transpose(1, 2)
        pos = proxy.pos_embed[0]
        grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        if (rows, cols) != (14, 14):
            scale = ((rows + 0.1) / 14, (cols + 0.1) / 14)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        tokens = torch.cat(
            [proxy.cls_token + pos[:1], patches + grid.flatten(2).transpose(1, 2)], 1
        )
        feat = proxy.norm(proxy.blocks(tokens))
        ex = feat[:, 1:, :].reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
        # custom_attn
        q_k = F.normalize(ex.flatten(2, 3), dim=1)
        sim = torch.einsum("bcm,bcn->bmn", q_k, q_k)
        sim = (sim - torch.mean(sim) * beta) * gamma
        sim[sim < 0.0] = float("-inf")
        attn = F.softmax(sim, dim=-1)[0]  # the same for every head
        # CLIP: patches, class token, positions resized to the grid (bilinear), blocks
        gh, gw = img.shape[-2] // 16, img.shape[-1] // 16
        x = vis.conv1(img).flatten(2).transpose(1, 2)
        pos = vis.positional_embedding
        n = int((pos.shape[0] - 1) ** 0.5)
        grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])
        cls = vis.class_embedding.view(1, 1, -1)
        x = _layer_norm(vis.ln_pre, torch.cat([cls, x], 1) + pos)
        blocks = list(vis.transformer.resblocks)
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        width = x.shape[-1]
        h = _layer_norm(last.ln_1, x)
        wv = last.attn.in_proj_weight[2 * width :]
        bv = last.attn.in_proj_bias[2 * width :]
        v = (h @ wv.T + bv)[0, 1:]  # [N, W]
        heads = last.attn.num_heads
        d = width // heads
        out = []
        for i in range(heads):
            vi = v[:, i * d : (i + 1) * d].reshape(gh, gw, d).permute(2, 0, 1)[None]
            vi = F.interpolate(vi, size=(rows, cols), mode="bilinear", align_corners=False)
            out.append(attn @ vi[0].flatten(1).T)
        y = _out_proj(last, torch.cat(out, dim=1))
        tokens = F.normalize(_layer_norm(vis.ln_post, y) @ vis.proj, dim=-1)
        logits = (tokens @ texts.embeddings.double().T).T.reshape(1, -1, rows, cols)
        if not pad:
            return logits[0]
        logits = F.interpolate(logits, size=img.shape[-2:], mode="bilinear")
        return logits[0, :, top : top + H, left : left + W]


@pytest.mark.parametrize(
    "size,grid",
    [((112, 112), (14, 14)), ((120, 100), (15, 12))],  # the second: not whole CLIP patches
)
def test_proxyclip_equals_its_authors_forward_step_by_step(vit_backend, proxy_folder, size, grid):
    folder, model = proxy_folder
    x = _clip_input(vit_backend, size)
    texts = _texts(vit_backend, PROMPTS)
    result = proxyclip(vit_backend, x, texts, proxy=str(folder))
    assert result.maps.shape == (2, 3, *grid)  # the proxy's grid
    for i in range(len(x)):
        expected = _reference(vit_backend, model, x[i], texts)
        torch.testing.assert_close(result.maps[i], expected.float(), atol=1e-5, rtol=1e-5)
    assert (result.image_embeddings is None) == (size != (112, 112))


def test_the_preset_pads_windows_to_56_as_the_authors_forward_slide(vit_backend, proxy_folder):
    folder, model = proxy_folder
    image = np.asarray(random_image(4, (81, 65)))  # 65×81: padded to 112×112, 23 + 24 wide
    names = ClassNames((("a dog",), ("a red square",), ("grass",)))
    protocol = get_preset("proxyclip/voc20").with_overrides(short_side=0, window=0)
    assert protocol.pad == 56
    segmenter = Segmenter(vit_backend, names, "proxyclip", protocol, {"proxy": str(folder)})
    prepared = segmenter.prepare(image)
    maps, failed = segmenter.window_maps([prepared])
    assert not failed and maps[(0, 0)].shape == (3, 65, 81)
    texts = segmenter.texts  # the 80 templates' mean, as the reference embeds names
    expected = _reference(vit_backend, model, prepared.image.cpu(), texts, pad=True)
    torch.testing.assert_close(maps[(0, 0)], expected.float(), atol=1e-5, rtol=1e-5)


def test_beta_and_gamma_shape_the_proxy_attention():
    f = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])  # cosines 0.8, 0, 0.6
    a = proxy_attention(f, beta=1.2, gamma=3.0)
    mean = (3 + 2 * (0.8 + 0.0 + 0.6)) / 9
    row0 = torch.tensor([1.0, 0.8, 0.0]) - 1.2 * mean  # the last is below 0: left out
    expected = torch.softmax(3.0 * row0[:2], dim=0)
    torch.testing.assert_close(a[0, 0], torch.cat([expected, torch.zeros(1)]))
    # beta 0 keeps every pair whose cosine is not negative
    assert (proxy_attention(f, beta=0.0, gamma=3.0)[0] > 0).all()


def test_a_token_whose_row_falls_under_the_mean_attends_to_itself():
    # all features alike: every logit (1 − 1.2) · 3 is negative; the reference gives 0 / 0
    f = torch.ones(1, 4, 8)
    torch.testing.assert_close(proxy_attention(f, 1.2, 3.0)[0], torch.eye(4))


def test_segment_cli_runs_proxyclip_with_a_local_proxy_on_the_test_bed(
    trained_clip, trained_backend, proxy_folder, tmp_path
):
    folder, _ = proxy_folder
    config, weights = trained_clip
    scene = make_scene(np.random.default_rng(5), size=64, n_objects=2)
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    names = ["background", *(o.name for o in scene.objects)]
    out = tmp_path / "out"
    model = ["--model-config", str(config), "--pretrained", str(weights), "--device", "cpu"]
    # windows of 100 pixels over the image resized to 112: each padded to 112
    args = ["segment", str(tmp_path / "scene.png"), "--preset", "proxyclip/voc20",
            "--classes", ",".join(names), "--short-side", "112", "--window", "100",
            "--stride", "50", "--proxy", str(folder), "--out", str(out), "-q", *model]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "proxyclip" and run["options"] == {"proxy": str(folder)}
    assert run["protocol"]["pad"] == 56 and run["protocol"]["window"] == 100
    labels = np.asarray(Image.open(out / "scene.png" / "labels.png"))
    protocol = get_preset("proxyclip/voc20").with_overrides(short_side=112, window=100, stride=50)
    segmenter = Segmenter(trained_backend, ClassNames(tuple((n,) for n in names)), "proxyclip",
                          protocol, {"proxy": str(folder)})  # fmt: skip
    [expected] = segmenter([scene.image])
    assert expected.windows == 4
    np.testing.assert_array_equal(labels, expected.labels)


@pytest.mark.parametrize(
    "extra,says",
    [
        (["--method", "proxyclip", "--proxy", "vit_base_patch8_224.dino"], "offline"),
        (["--method", "proxyclip", "--proxy", "nowhere/model.safetensors"], "no such file"),
        (
            ["--method", "sclip", "--proxy", "vit_base_patch8_224.dino"],
            "unknown method option 'proxy'",
        ),
    ],
)
def test_segment_cli_refuses_a_proxy_it_cannot_use_in_one_line(
    tiny_weights, tmp_path, monkeypatch, extra, says
):
    monkeypatch.setattr(hub, "cached_hf_file", lambda repo, names: None)  # nothing cached
    config, weights = tiny_weights["vit"]
    random_image(0, (64, 64)).save(tmp_path / "a.png")
    args = ["segment", str(tmp_path / "a.png"), "--classes", "a,b", "--out", str(tmp_path / "o"),
            *extra, "--model-config", str(config), "--pretrained", str(weights)]  # fmt: skip
    result = runner.invoke(app, args, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o" / "a.png").exists()


def test_bench_leaves_proxyclip_out_unless_named():
    from clipviz.runs.bench import default_methods

    assert "proxyclip" not in default_methods() and "clearclip" in default_methods()


def test_eval_takes_the_proxy_as_segment_does(trained_clip, proxy_folder, tmp_path):
    folder, _ = proxy_folder
    config, weights = trained_clip
    write_voc(tmp_path / "voc", 2, seed=8)
    args = ["eval", str(tmp_path / "voc"), "--task", "segment", "-m", "proxyclip", "--proxy",
            str(folder), "--short-side", "0", "--window", "0", "--json", str(tmp_path / "r.json"),
            "-q", "--model-config", str(config), "--pretrained", str(weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["method_options"]["proxyclip"]["proxy"] == str(folder), saved.keys()


def test_a_rerun_redoes_the_images_when_the_proxy_weights_were_replaced(tiny_weights, tmp_path):
    folder, _ = write_proxy_folder(tmp_path / "proxy", "dino", seed=3)
    random_image(0, (64, 48)).save(tmp_path / "a.png")
    config, weights = tiny_weights["vit"]
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "a.png"), "--method", "proxyclip", "--proxy", str(folder),
            "--classes", "sky,grass", "--short-side", "64", "--window", "0", "--out", str(out),
            "-q", "--workers", "0", "--model-config", str(config), "--pretrained", str(weights),
            "--device", "cpu"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0  # the same weights: skipped
    write_proxy_folder(tmp_path / "proxy", "dino", seed=4)  # other weights, the same path
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "skipped", "ok"]


def test_eval_segments_again_when_the_proxy_weights_were_replaced(vit_backend, tmp_path):
    from clipviz.data.datasets.semseg import open_segmentation
    from clipviz.runs.segment_eval import SegmentEvalOptions, evaluate_segmentation
    from clipviz.segment import Protocol

    folder, _ = write_proxy_folder(tmp_path / "proxy", "dino", seed=3)
    write_voc(tmp_path / "voc", 2, seed=1, size=64)
    dataset = open_segmentation(tmp_path / "voc", "voc")
    classes = ClassNames(tuple((n,) for n in dataset.class_names or []))
    opts = SegmentEvalOptions(methods=("proxyclip",), protocol=Protocol(short_side=0, window=0),
                              method_options={"proxyclip": {"proxy": str(folder)}})  # fmt: skip
    seen: list[int] = []

    def run():
        seen.clear()
        evaluate_segmentation(vit_backend, dataset, classes, opts, tmp_path / "r.jsonl",
                              on_image=lambda r: seen.append(r["index"]))  # fmt: skip
        return list(seen)

    assert run() == [0, 1]
    assert run() == []  # the same weights: nothing to do
    write_proxy_folder(tmp_path / "proxy", "dino", seed=4)  # other weights, the same path
    assert run() == [0, 1]


def test_explain_and_maps_eval_keys_follow_a_local_proxys_weights(vit_backend, tmp_path):
    from clipviz.data.datasets.common import EvalDataset
    from clipviz.runs import evaluate, explain
    from clipviz.runs.manifest import methods_proxy_weights
    from clipviz.runs.outputs import RenderOptions

    folder, _ = write_proxy_folder(tmp_path / "proxy", "dino", seed=3)
    texts = vit_backend.encode_texts(["sky"])
    options = {"proxyclip": {"proxy": str(folder)}}
    dataset = EvalDataset("d", tmp_path, "generic", ["sky"], [], lambda e: e)

    def keys():
        return (
            explain.request_key(vit_backend, ["proxyclip"], texts, RenderOptions(), options),
            evaluate.request_key(vit_backend, dataset, texts,
                                 evaluate.EvalOptions(methods=("proxyclip",),
                                                      method_options=options)),
        )  # fmt: skip

    before = keys()
    assert keys() == before  # the same weights: the same requests
    write_proxy_folder(tmp_path / "proxy", "dino", seed=4)  # other weights, the same path
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]
    # a model hub name reads no local file: nothing is added, earlier keys hold
    assert methods_proxy_weights({"proxyclip": {"proxy": "vit_small_patch16_224.dino"}}) == {}
