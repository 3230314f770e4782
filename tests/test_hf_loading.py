"""Loading `transformers:` folders and weights files: what is wrong is refused in one line
(missing, unexpected or misshapen tensors, pickled objects, a config the weights cannot fill,
a path that is no model folder); folders shaped as the hub publishes five families load and
explain with their published tokenizer and preprocessing; the plain forward runs fused."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_dirs, random_image
from hf_tiny import CLIP_MEAN, CLIP_STD, HUB_SHAPED
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import clipviz
from clipviz.cli import app
from clipviz.errors import ClipvizError

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(tmp_path, family="hf-clip"):
    folder = tmp_path / family
    shutil.copytree(hf_dirs()[family], folder)
    return folder


def _refusal(spec: str) -> ClipvizError:
    with pytest.raises(ClipvizError) as e:
        clipviz.load_model(spec, device="cpu", text_cache=False)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    return e.value


def test_a_folder_missing_tensors_is_refused_naming_them(tmp_path):
    folder = _copy(tmp_path)
    state = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in state.items() if "vision_model.encoder.layers.1." not in k}
    save_file({k: v for k, v in kept.items() if k != "visual_projection.weight"},
              str(folder / "model.safetensors"))  # fmt: skip
    message = str(_refusal(f"transformers:{folder}"))
    assert "missing" in message and "vision_model.encoder.layers.1." in message
    assert "17 tensors" in message  # 16 of the layer and the projection


def test_a_folder_with_unexpected_or_misshapen_tensors_is_refused(tmp_path):
    folder = _copy(tmp_path)
    state = load_file(folder / "model.safetensors")
    save_file({**state, "extra.weight": torch.zeros(3)}, str(folder / "model.safetensors"))
    assert "unexpected" in str(_refusal(f"transformers:{folder}"))
    state["visual_projection.weight"] = torch.zeros(5, 7)
    save_file(state, str(folder / "model.safetensors"))
    message = str(_refusal(f"transformers:{folder}"))
    assert "visual_projection.weight" in message and "5, 7" in message


def test_pickled_objects_in_a_transformers_folder_are_refused(tmp_path):
    folder = _copy(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"payload": time.struct_time((0,) * 9)}, folder / "pytorch_model.bin")
    message = str(_refusal(f"transformers:{folder}"))
    assert "pickled" in message and "weights_only" not in message


def test_a_config_larger_than_its_weights_is_refused_before_building(tmp_path):
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    message = str(_refusal(f"transformers:{folder}"))
    assert "config.json" in message and "does not match" in message


def test_paths_that_are_not_model_folders_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    (tmp_path / "empty").mkdir()
    assert "not a folder" in str(_refusal(f"transformers:{tmp_path / 'passwd'}"))
    assert "does not exist" in str(_refusal("transformers:./nope"))
    assert "no config.json" in str(_refusal(f"transformers:{tmp_path / 'empty'}"))


def test_a_broken_weights_file_is_one_line_from_the_command_line(tmp_path):
    folder = _copy(tmp_path)
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    random_image(0).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "a.png"), "a cat", "--model",
                                      f"transformers:{folder}", "-q"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "model.safetensors" in result.output and "internal error" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_tokenizer_without_a_length_takes_the_models_positions(tmp_path):
    folder = _copy(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    b = clipviz.load_model(f"transformers:{folder}", device="cpu", text_cache=False)
    assert b.tokenizer.context_length == 16  # the text config's max_position_embeddings
    assert clipviz.explain(b, [random_image(0)], ["a cat"], ensemble=False).maps.shape[1] == 1


def test_open_clip_weights_missing_a_tensor_name_it(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    state = load_file(weights)
    save_file(
        {k: v for k, v in state.items() if k != "visual.proj"}, str(tmp_path / "w.safetensors")
    )
    with pytest.raises(ClipvizError, match=r"missing 1 tensor: visual\.proj") as e:
        clipviz.load_model(model_config=config, pretrained=str(tmp_path / "w.safetensors"))
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def hub_shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-shaped")
    return {repo: write(root / repo.replace("/", "--")) for repo, write in HUB_SHAPED.items()}


@pytest.mark.parametrize(
    ("repo", "grid", "length", "mean"),
    [
        ("openai/clip-vit-base-patch16", 14, 77, CLIP_MEAN),
        ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", 7, 77, CLIP_MEAN),
        ("google/siglip-base-patch16-224", 14, 64, [0.5] * 3),
        ("google/siglip2-base-patch16-224", 14, 64, [0.5] * 3),
        ("facebook/metaclip-b16-fullcc2.5b", 14, 77, CLIP_MEAN),
    ],
)
def test_hub_shaped_folders_explain_with_their_published_settings(hub_shaped, repo, grid, length,
                                                                   mean):  # fmt: skip
    from transformers import AutoProcessor

    folder = hub_shaped[repo]
    b = clipviz.load_model(f"transformers:{folder}", device="cpu", text_cache=False)
    pre = b.preprocess
    assert b.input_size == (224, 224) and b.tokenizer.context_length == length
    assert list(pre.mean) == pytest.approx(mean) and list(pre.std) == pytest.approx(
        CLIP_STD if mean == CLIP_MEAN else [0.5] * 3
    )
    prompts = ["a photo of a cat", "a dog"]
    texts = b.encode_texts(prompts, ensemble=False)
    hf = b.model.hf
    siglip = "siglip" in repo
    pad = {"padding": "max_length", "max_length": length} if siglip else {"padding": True}
    tokens = AutoProcessor.from_pretrained(folder).tokenizer(prompts, return_tensors="pt", **pad)
    with torch.no_grad():
        own = hf.get_text_features(**tokens)
        own = F.normalize(own if torch.is_tensor(own) else own.pooler_output, dim=-1)
    torch.testing.assert_close(texts.embeddings, own, atol=1e-5, rtol=1e-4)
    e = clipviz.explain(b, [random_image(1)], texts, "itsm")
    assert e.maps.shape == (1, 2, grid, grid) and bool(torch.isfinite(e.maps).all())


def test_the_plain_forward_does_not_materialise_attention(family_backends, monkeypatch):
    import clipviz.backend.hf as hf

    b = family_backends("hf-clip")
    x = torch.stack([b.preprocess(random_image(seed=i)) for i in range(2)])
    with torch.no_grad():
        h = b.vit.embed(x)
        explicit = h
        for i in range(b.vit.depth):
            explicit = b.vit.block_with_attention(i, explicit)[0]

        def refuse(*args, **kwargs):
            raise AssertionError("the plain forward built attention probabilities")

        monkeypatch.setattr(hf, "attention_probs", refuse)
        fused = b.vit.run_blocks(h)
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
        embedding = b.vit.image_embedding(x)
    own = b.model.hf.get_image_features(pixel_values=x)
    own = own if torch.is_tensor(own) else own.pooler_output
    torch.testing.assert_close(embedding, own, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["hf-clip", "hf-siglip"])
def test_maps_are_the_same_with_fused_and_explicit_blocks(family_backends, family, monkeypatch):
    from clipviz.backend.hf import HFViTTower

    b = family_backends(family)
    x = torch.stack([b.preprocess(random_image(seed=i)) for i in range(2)])
    methods = ["itsm", "gradcam", "legrad"]
    fused = {m: clipviz.explain(b, x, ["a cat", "a dog"], m, ensemble=False).maps for m in methods}
    monkeypatch.setattr(HFViTTower, "run_block", lambda s, i, h: s.block_with_attention(i, h)[0])
    for m in methods:
        explicit = clipviz.explain(b, x, ["a cat", "a dog"], m, ensemble=False).maps
        torch.testing.assert_close(fused[m], explicit, atol=1e-5, rtol=1e-4)
