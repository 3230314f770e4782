"""Grad-ECLIP against a port of the authors' notebooks (Cyang-Zhao/Grad-Eclip:
`grad_eclip_image.ipynb` `clip_encode_dense`, `attention_layer`, `sim_qk`, `grad_eclip`;
`grad_eclip_text.ipynb` `clip_encode_text_dense` and its token map) on a float64 copy, in
the reference's sequence-first layout."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, save_random_weights
from reference import _batch, _texts, _vit_input

from clipviz import ClipvizError, explain
from clipviz.backend import load_backend
from clipviz.methods.gradeclip import gradeclip

PROMPTS = ["a red dog", "grass", "a small blue square on the left"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _attention_layer(q, k, v, mask=None):
    """The notebook's `attention_layer(q, k, v, 1)`: one head over the full width, [L, 1, W]."""
    scale = q.shape[-1] ** -0.5
    weights = torch.bmm(q.transpose(0, 1) * scale, k.transpose(0, 1).transpose(1, 2))
    if mask is not None:
        weights = weights + mask
    out = torch.bmm(weights.softmax(dim=-1), v.transpose(0, 1))
    return out.transpose(0, 1)


def _encode_dense(blocks, x, n, mask=None):
    """`clip_encode_dense`'s loop over the last `n` blocks, sequence-first `[L, 1, W]`;
    returns the output and per block (q, k, v, attention output)."""
    for block in blocks[:-n]:
        x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    saved = []
    for block in blocks[-n:]:
        x_in = x
        h = F.layer_norm(x_in, block.ln_1.normalized_shape, block.ln_1.weight, block.ln_1.bias)
        q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
        a = _attention_layer(q, k, v, mask)
        saved.append((q, k, v, a))
        x = F.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias) + x_in
        x = x + block.mlp(block.ln_2(x))
    return x, saved


def _sim_qk(q, k):
    q_cls = F.normalize(q[:1, 0, :], dim=-1)
    k_patch = F.normalize(k[1:, 0, :], dim=-1)
    c = (q_cls * k_patch).sum(-1)
    return (c - c.min()) / (c.max() - c.min())


def _image_reference(model, image, text, n=1):
    """The notebook's image map of one image `[3, H, W]` for one unit text `[D]`."""
    v = model.visual
    with torch.enable_grad():
        x = _vit_input(v, image[None].double()).transpose(0, 1)  # [L, 1, W]
        x, saved = _encode_dense(list(v.transformer.resblocks), x, n)
        out = F.layer_norm(x.transpose(0, 1), v.ln_post.normalized_shape, v.ln_post.weight,
                           v.ln_post.bias) @ v.proj  # fmt: skip
        c = (F.normalize(out[:, 0], dim=-1) @ text)[0]
        maps = []
        for q, k, val, a in saved:
            grad = torch.autograd.grad(c, a, retain_graph=True)[0]
            maps.append((grad[:1, 0, :] * val[1:, 0, :] * _sim_qk(q, k)[:, None]).sum(-1))
    return F.relu(torch.stack(maps)).sum(0)  # ReLU per block, then the sum


def _text_reference(model, tokenizer, prompt, image_embedding, n):
    """The text notebook: token weights between SOT and EOT, summing to 1."""
    tokens = tokenizer([prompt])
    eos = int(tokens.argmax(dim=-1))
    with torch.enable_grad():
        x = (model.token_embedding(tokens) + model.positional_embedding).transpose(0, 1)
        x, saved = _encode_dense(list(model.transformer.resblocks), x, n, model.attn_mask)
        x = model.ln_final(x.transpose(0, 1))
        emb = x[torch.arange(1), tokens.argmax(-1)] @ model.text_projection
        c = (image_embedding @ F.normalize(emb, dim=-1).T)[0, 0]
        total = 0
        for q, k, val, a in saved:
            grad = torch.autograd.grad(c, a, retain_graph=True)[0]
            qk = (F.normalize(q[eos, 0, :], dim=-1) * F.normalize(k[:, 0, :], dim=-1)).sum(-1)
            qk = (qk - qk.min()) / (qk.max() - qk.min())
            total = total + (grad[eos, 0, :] * val[:, 0, :] * qk[:, None]).sum(-1)
    emap = F.relu(total)[1:eos]  # the sum over blocks, then ReLU (the text notebook's order)
    return emap / emap.sum()


@pytest.fixture(scope="module")
def deep_text_backend(tmp_path_factory):
    """The tiny ViT with a 3-block text tower, so the text side spans several blocks."""
    root = tmp_path_factory.mktemp("gradeclip")
    cfg = json.loads((CONFIGS / "tiny-vit.json").read_text())
    cfg["text_cfg"]["layers"] = 3
    config = root / "tiny-vit-text3.json"
    config.write_text(json.dumps(cfg))
    weights = save_random_weights(config, root / "w.safetensors", seed=3)
    return load_backend(model_config=str(config), pretrained=str(weights), device="cpu")


@pytest.fixture(scope="module")
def open_text_backend(tmp_path_factory):
    """The tiny ViT with a 3-block text tower without a causal mask (every token attends to
    every other, as CLIPA's)."""
    root = tmp_path_factory.mktemp("gradeclip-open")
    cfg = json.loads((CONFIGS / "tiny-vit.json").read_text())
    cfg["text_cfg"].update(layers=3, no_causal_mask=True)
    config = root / "tiny-vit-open-text.json"
    config.write_text(json.dumps(cfg))
    weights = save_random_weights(config, root / "w.safetensors", seed=4)
    return load_backend(model_config=str(config), pretrained=str(weights), device="cpu")


def _rows_through(modules, run):
    """How many token rows pass through each of `modules` while `run()` runs."""
    counts = [0] * len(modules)

    def hook(i):
        return lambda module, args, out: counts.__setitem__(i, counts[i] + out[..., 0].numel())

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize("layers", [1, 2])
def test_image_map_equals_the_notebooks_grad_eclip(vit_backend, layers):
    b = vit_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    m = copy.deepcopy(b.model).double().requires_grad_(True)  # as the notebook loads it
    result = gradeclip(b, x, texts, layers=layers)
    for i in range(x.shape[0]):
        for t in range(len(PROMPTS)):
            expected = _image_reference(m, x[i], texts.embeddings[t].double(), n=layers)
            torch.testing.assert_close(
                result.maps[i, t].flatten(), expected.float(), atol=1e-5, rtol=1e-4
            )


def test_image_map_without_key_weights_drops_the_qk_factor(vit_backend):
    b = vit_backend
    x, texts = _batch(b), _texts(b, PROMPTS)
    weighted = gradeclip(b, x, texts).maps
    plain = gradeclip(b, x, texts, key_weights=False).maps
    assert not torch.allclose(weighted, plain, atol=1e-6)
    # the q-k weights lie in [0, 1]: they only shrink the positive terms
    assert bool((weighted <= plain + 1e-6).all())


@pytest.mark.parametrize("text_layers", [1, 3, 8])
def test_text_importance_equals_the_text_notebook(deep_text_backend, text_layers):
    b = deep_text_backend
    x = _batch(b)
    texts = _texts(b, PROMPTS)
    m = copy.deepcopy(b.model).double().requires_grad_(True)  # as the notebook loads it
    result = gradeclip(b, x, texts, text_layers=text_layers)
    importance = result.extras["text_importance"]  # [B, T, n]
    words = result.labels["text_tokens"]
    assert words[0][:3] == ["a", "red", "dog"] and words[1][1:] == [""] * (len(words[1]) - 1)
    stock = F.normalize(m.encode_image(x.double()), dim=-1)
    for i in range(x.shape[0]):
        for t, prompt in enumerate(PROMPTS):
            n = min(text_layers, 3)
            expected = _text_reference(m, b.tokenizer, prompt, stock[i : i + 1], n)
            got = importance[i, t, : len(expected)]
            expected = expected.nan_to_num(0.0)  # no positive token: the reference's 0/0
            torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)
            assert torch.isnan(importance[i, t, len(expected) :]).all()


def test_text_importance_without_a_causal_mask_equals_the_text_notebook(open_text_backend):
    b = open_text_backend
    assert not b.text_tower.causal and b.model.attn_mask is None
    x, texts = _batch(b), _texts(b, PROMPTS)
    m = copy.deepcopy(b.model).double().requires_grad_(True)
    importance = gradeclip(b, x, texts, text_layers=3).extras["text_importance"]
    stock = F.normalize(m.encode_image(x.double()), dim=-1)
    for i in range(x.shape[0]):
        for t, prompt in enumerate(PROMPTS):
            expected = _text_reference(m, b.tokenizer, prompt, stock[i : i + 1], 3)
            got = importance[i, t, : len(expected)]
            torch.testing.assert_close(got, expected.nan_to_num(0.0).float(), atol=1e-5, rtol=1e-4)


def test_text_side_runs_each_prompt_once_and_one_row_per_image(deep_text_backend):
    """Under the causal mask the text blocks run once per prompt; each further image adds
    only the pooled row of each explained block (its gradient's path), not a whole prompt."""
    b = deep_text_backend
    assert b.text_tower.causal
    texts = _texts(b, PROMPTS)
    mlps = [block.mlp for block in b.model.transformer.resblocks]

    def rows(n):
        x = _batch(b, n)
        return _rows_through(mlps, lambda: gradeclip(b, x, texts, text_layers=2))

    one, three = rows(1), rows(3)
    T, L = len(PROMPTS), b.model.context_length
    assert one[0] == three[0] == T * L  # a block before the explained ones: once per prompt
    assert [c - d for c, d in zip(three[1:], one[1:], strict=True)] == [2 * T, 2 * T]


@pytest.mark.parametrize("layers", [1, 2])
def test_image_side_computes_the_last_block_at_the_class_token_alone(vit_backend, layers):
    """Every block but the last sees every token, once in the stock forward and once more
    when explained; the last one, stock and explained, only the class token, all that the
    embedding reads."""
    b = vit_backend
    x, texts = _batch(b), _texts(b, PROMPTS)
    blocks = list(b.model.visual.transformer.resblocks)
    seen = _rows_through(
        [blocks[0].mlp, blocks[-1].mlp],
        lambda: gradeclip(b, x, texts, layers=layers, text_layers=0),
    )
    B, L = x.shape[0], 1 + 4 * 4
    assert tuple(seen) == {1: (B * L, 2 * B), 2: (2 * B * L, B * L + B)}[layers]


def test_text_importance_reaches_the_npz_of_a_run(vit_backend, tmp_path):
    import numpy as np

    from clipviz.runs.outputs import RenderOptions, write_outputs

    b = vit_backend
    x = _batch(b, 1)
    e = explain(b, x, ["a red dog"], method="gradeclip", ensemble=False)
    image = np.zeros((64, 64, 3), np.uint8)
    write_outputs(tmp_path, image, [e], 0, RenderOptions())
    with np.load(tmp_path / "maps.npz") as npz:
        assert list(npz["text_tokens"][0]) == ["a", "red", "dog"]
        np.testing.assert_allclose(npz["text_importance"], e.extras["text_importance"][0].numpy())


def test_gradeclip_needs_a_class_token(family_backends):
    b = family_backends("pe")  # PE-Core: a MAP head, no class token to read the gradient at
    with pytest.raises(ClipvizError, match="gradeclip"):
        explain(b, _batch(b), PROMPTS, method="gradeclip", ensemble=False)


def test_gradeclip_runs_on_a_rotary_class_token_tower(family_backends):
    b = family_backends("eva")
    e = explain(b, _batch(b), PROMPTS, method="gradeclip", ensemble=False)
    assert bool((e.maps >= 0).all()) and e.maps.amax(dim=(2, 3)).min() > 0
    torch.testing.assert_close(e.extras["text_importance"].nansum(-1), torch.ones(2, 3))


def test_text_importance_reaches_the_manifest_and_the_report(tmp_path, tiny_weights):
    from conftest import random_image
    from typer.testing import CliRunner

    from clipviz.cli import app

    random_image(seed=5).save(tmp_path / "photo.png")
    config, weights = tiny_weights["vit"]
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["explain", str(tmp_path / "photo.png"), "a red dog", "grass",
                                 "-m", "gradeclip", "-m", "itsm", "--no-ensemble", "-o", str(out),
                                 "--model-config", str(config), "--pretrained", str(weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rec = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    tokens = rec["text_importance"]["gradeclip"]["a red dog"]
    assert [t for t, _ in tokens] == ["a", "red", "dog"]
    assert sum(w for _, w in tokens) == pytest.approx(1.0, abs=1e-3) or all(
        w == 0 for _, w in tokens
    )
    assert set(rec["text_importance"]) == {"gradeclip"}  # itsm explains no text side
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    from test_report import _page_data

    data = _page_data((out / "report.html").read_text())
    (entry,) = [p for p in data["images"]["photo.png"]["prompts"] if p["prompt"] == "a red dog"]
    assert [t for t, _ in entry["tokens"]] == ["a", "red", "dog"]
    assert entry["tokenMax"] == max(w for _, w in entry["tokens"])


def test_text_layers_zero_gives_the_image_map_alone(vit_backend):
    b = vit_backend
    x, texts = _batch(b), _texts(b, PROMPTS)
    alone = gradeclip(b, x, texts, text_layers=0)
    assert alone.extras == {} and alone.labels == {}
    torch.testing.assert_close(alone.maps, gradeclip(b, x, texts).maps)
    with pytest.raises(ClipvizError, match="text_layers=-1"):
        gradeclip(b, x, texts, text_layers=-1)
