"""Hugging Face transformers CLIPModel and SiglipModel (tiny, random weights, tokenizers built
locally, written with save_pretrained): loaded as `transformers:DIR`, wrapped in memory,
and read against the models' own forward."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_dirs, random_image
from typer.testing import CliRunner

import clipviz
from clipviz.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a cat", "a dog"]


def _batch(b, n=2):
    return torch.stack([b.preprocess(random_image(seed=30 + i)) for i in range(n)])


def _hf(b):
    return b.model.hf


def _reference_patches(b, x):
    """Per-patch joint-space tokens from the model's own vision forward and head weights."""
    hf = _hf(b)
    vm = hf.vision_model
    with torch.no_grad():
        out = vm(pixel_values=x, output_hidden_states=True)
        if hasattr(vm, "head") and vm.head is not None:  # SigLIP: post-LN'd, the probe's values
            last = out.last_hidden_state
            head = vm.head
            W = last.shape[-1]
            v = (
                last @ head.attention.in_proj_weight[2 * W :].T
                + head.attention.in_proj_bias[2 * W :]
            )
            y = head.attention.out_proj(v)
            return F.normalize(y + head.mlp(head.layernorm(y)), dim=-1)
        last = vm.post_layernorm(out.last_hidden_state[:, 1:])
        return F.normalize(hf.visual_projection(last), dim=-1)


@pytest.mark.parametrize("family", ["hf-clip", "hf-siglip"])
def test_itsm_and_scores_are_the_models_own(family_backends, family):
    b = family_backends(family)
    x = _batch(b)
    texts = b.encode_texts(PROMPTS, ensemble=False)
    exp = clipviz.explain(b, x, texts, "itsm")
    patches = _reference_patches(b, x)
    expected = (patches @ texts.embeddings.T).transpose(1, 2).reshape(2, 2, 4, 4)
    torch.testing.assert_close(exp.maps, expected, atol=1e-5, rtol=1e-4)
    hf = _hf(b)
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=x)
        image = F.normalize(image if torch.is_tensor(image) else image.pooler_output, dim=-1)
        tok = b.tokenizer(PROMPTS)
        text = hf.get_text_features(**tok)
        text = F.normalize(text if torch.is_tensor(text) else text.pooler_output, dim=-1)
    torch.testing.assert_close(texts.embeddings, text, atol=1e-5, rtol=1e-5)
    cos = image @ text.T
    torch.testing.assert_close(exp.scores, cos, atol=1e-5, rtol=1e-5)
    logits = hf.logit_scale.exp() * cos
    if family == "hf-siglip":
        torch.testing.assert_close(exp.probs, torch.sigmoid(logits + hf.logit_bias))
    else:
        torch.testing.assert_close(exp.probs, logits.softmax(dim=-1))


@pytest.mark.parametrize("family", ["hf-clip", "hf-siglip"])
def test_explicit_layers_equal_the_models_eager_attention(family_backends, family):
    from transformers import AutoModel

    b = family_backends(family)
    x = _batch(b)
    eager = AutoModel.from_pretrained(str(hf_dirs()[family]), attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager.vision_model(pixel_values=x, output_hidden_states=True, output_attentions=True)
        h = b.vit.embed(x)
        torch.testing.assert_close(h, out.hidden_states[0], atol=1e-5, rtol=1e-4)
        for i in range(b.vit.depth):
            h, probs = b.vit.block_with_attention(i, h)
            torch.testing.assert_close(h, out.hidden_states[i + 1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(probs, out.attentions[i], atol=1e-6, rtol=1e-4)


def test_models_loaded_in_a_notebook_give_the_same_maps(family_backends):
    from transformers import AutoModel, AutoProcessor

    folder = str(hf_dirs()["hf-siglip"])
    wrapped = clipviz.from_transformers(
        AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    )
    loaded = family_backends("hf-siglip")
    x = _batch(loaded)
    a = clipviz.explain(wrapped, x, PROMPTS, "legrad", ensemble=False)
    b = clipviz.explain(loaded, x, PROMPTS, "legrad", ensemble=False)
    torch.testing.assert_close(a.maps, b.maps)


@pytest.mark.open_clip
def test_from_open_clip_wraps_a_loaded_model(vit_backend):
    import open_clip

    model = copy.deepcopy(vit_backend.model)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None)
    backend = clipviz.from_open_clip(model, preprocess, vit_backend.tokenizer, device="cpu")
    assert backend.input_size == (64, 64)  # the model's own size, its transform's mean/std
    x = _batch(vit_backend)
    torch.testing.assert_close(
        clipviz.explain(backend, x, PROMPTS, "gradcam").maps,
        clipviz.explain(vit_backend, x, PROMPTS, "gradcam").maps,
    )


def test_explain_a_transformers_model_from_the_command_line(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, [
        "explain", str(tmp_path / "a.png"), "a cat", "-m", "itsm", "-m", "legrad",
        "--model", f"transformers:{hf_dirs()['hf-siglip']}", "-o", str(tmp_path / "out"), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.png" / "comparison.png").is_file()


def test_a_missing_transformers_model_offline_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    random_image(0).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "a.png"), "a cat", "--model",
                                      "transformers:nobody/no-such-model"])  # fmt: skip
    assert result.exit_code == 2
    assert "cannot be reached" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_hub_model_from_the_local_cache_is_identified_by_its_cached_weights_file(tmp_path):
    import hashlib
    import json
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--someone--tiny-clip" / "snapshots" / "0123abcd"
    shutil.copytree(hf_dirs()["hf-clip"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    code = ("import json, clipviz; b = clipviz.load_model('transformers:someone/tiny-clip', "
            "device='cpu'); print(json.dumps(b.identity))")  # fmt: skip
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    identity = json.loads(out.stdout.strip().splitlines()[-1])
    weights = snapshot / "model.safetensors"
    assert identity["weights_file"] == str(weights)
    assert identity["weights"] == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()


def test_siglip2_naflex_embeddings_equal_the_models_on_its_processors_patches(family_backends):
    """SigLIP2: the image cut into patches here gives the embedding the model computes from
    its own processor's patch sequence, and the explicit layers its eager attention."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    b = family_backends("hf-siglip2")
    assert b.family == "transformers SigLIP2 (NaFlex)" and b.input_size == (64, 64)
    folder = str(hf_dirs()["hf-siglip2"])
    processor = AutoProcessor.from_pretrained(folder)
    eager = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    images = [random_image(seed=i, size=(64, 64)) for i in range(2)]  # a 4 x 4 grid, no resize
    inputs = processor(images=images, max_num_patches=16, return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [[4, 4], [4, 4]]
    with torch.no_grad():
        own = eager.get_image_features(**inputs)
        own = F.normalize(own if torch.is_tensor(own) else own.pooler_output, dim=-1)
        x = torch.stack([b.preprocess(im) for im in images])
        torch.testing.assert_close(b.image_embeddings(x), own, atol=1e-5, rtol=1e-4)
        out = eager.vision_model(**{k: inputs[k] for k in ("pixel_values", "pixel_attention_mask",
                                                           "spatial_shapes")},
                                 output_hidden_states=True, output_attentions=True)  # fmt: skip
        h = b.vit.embed(x)
        torch.testing.assert_close(h, out.hidden_states[0], atol=1e-5, rtol=1e-4)
        for i in range(b.vit.depth):
            h, probs = b.vit.block_with_attention(i, h)
            torch.testing.assert_close(h, out.hidden_states[i + 1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(probs, out.attentions[i], atol=1e-6, rtol=1e-4)
    e = clipviz.explain(b, x, PROMPTS, "itsm", ensemble=False)
    assert e.maps.shape == (2, 2, 4, 4)
    torch.testing.assert_close(e.probs, torch.sigmoid(b.logit_scale * e.scores + b.logit_bias))
    wider = clipviz.load_model(f"transformers:{folder}", resolution=96, device="cpu")
    assert clipviz.explain(wider, [Image.fromarray(np.zeros((64, 64, 3), np.uint8))], ["a cat"],
                           ensemble=False).maps.shape[-2:] == (6, 6)  # fmt: skip
