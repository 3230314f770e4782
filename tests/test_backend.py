"""The backend against independent computations from open_clip's own forward pieces."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, save_random_weights

import clipviz
from clipviz import ClipvizError
from clipviz.backend import ensemble_templates


def _batch(backend, n=2):
    return torch.stack([backend.preprocess(random_image(seed=i)) for i in range(n)])


def _raw_text(backend, prompts):
    return F.normalize(backend.model.encode_text(backend.tokenizer(prompts)), dim=-1)


def test_vit_itsm_equals_forward_intermediates_projection(vit_backend):
    b = vit_backend
    x = _batch(b)
    prompts = ["a dog", "a red square"]
    exp = clipviz.explain(b, x, prompts, ensemble=False)

    v = b.model.visual
    with torch.no_grad():
        out = v.forward_intermediates(
            x, indices=[len(v.transformer.resblocks) - 1], output_fmt="NLC"
        )
        patches = F.normalize(v.ln_post(out["image_intermediates"][-1]) @ v.proj, dim=-1)
        text = _raw_text(b, prompts)
        expected = torch.einsum("bnd,td->btn", patches, text).reshape(2, 2, 4, 4)
        image = F.normalize(b.model.encode_image(x), dim=-1)
    torch.testing.assert_close(exp.maps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.scores, image @ text.T, atol=1e-5, rtol=1e-5)
    probs = (b.model.logit_scale.exp() * image @ text.T).softmax(-1)
    torch.testing.assert_close(exp.probs, probs, atol=1e-5, rtol=1e-5)


def test_rn_itsm_equals_attention_pool_with_every_position_as_query(rn_backend):
    b = rn_backend
    x = _batch(b)
    prompts = ["a dog", "a red square", "grass"]
    exp = clipviz.explain(b, x, prompts, ensemble=False)

    v = b.model.visual
    pool = v.attnpool
    with torch.no_grad():
        feats = v.forward_intermediates(x, indices=[4], intermediates_only=True)
        f = feats["image_intermediates"][-1]  # [B, C, h, w]
        seq = f.flatten(2).permute(2, 0, 1)  # [N, B, C]
        seq = torch.cat([seq.mean(0, keepdim=True), seq]) + pool.positional_embedding[:, None]
        out, _ = F.multi_head_attention_forward(
            query=seq,
            key=seq,
            value=seq,
            embed_dim_to_check=seq.shape[-1],
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=False,
            need_weights=False,
        )
        tokens = F.normalize(out.permute(1, 0, 2), dim=-1)  # [B, 1+N, D]
        text = _raw_text(b, prompts)
        expected = torch.einsum("bnd,td->btn", tokens[:, 1:], text).reshape(2, 3, 2, 2)
        image = F.normalize(b.model.encode_image(x), dim=-1)
    torch.testing.assert_close(tokens[:, 0], image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.maps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.scores, image @ text.T, atol=1e-5, rtol=1e-5)


def test_ensemble_is_the_normalised_mean_of_template_embeddings(vit_backend):
    from open_clip import build_zero_shot_classifier

    templates = [lambda c, t=t: t.format(c) for t in ensemble_templates()]
    assert len(templates) == 85
    with torch.no_grad():
        expected = build_zero_shot_classifier(
            vit_backend.model,
            vit_backend.tokenizer,
            ["dog", "red car"],
            templates,
            device="cpu",
            use_tqdm=False,
        ).T
    got = vit_backend.encode_texts(["dog", "red car"]).embeddings
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, vit_backend.encode_texts(["dog", "red car"], False).embeddings)


def test_text_embeddings_come_back_from_the_disk_cache(tiny_weights, monkeypatch):
    config, weights = tiny_weights["vit"]
    first = clipviz.load_model(model_config=config, pretrained=str(weights))
    emb = first.encode_texts(["a cached prompt"]).embeddings
    second = clipviz.load_model(model_config=config, pretrained=str(weights))

    def no_model(*args, **kwargs):
        raise AssertionError("the text tower ran although the embedding was cached")

    monkeypatch.setattr(second, "embed_texts", no_model)
    torch.testing.assert_close(second.encode_texts(["a cached prompt"]).embeddings, emb)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("resolution", [None, 128])
def test_explaining_leaves_the_model_and_its_forward_unchanged(tiny_weights, resolution):
    for tower in ("vit", "rn"):
        config, weights = tiny_weights[tower]
        b = clipviz.load_model(model_config=config, pretrained=str(weights), resolution=resolution)
        stock = clipviz.load_model(model_config=config, pretrained=str(weights))
        x_stock = _batch(stock)
        before_state = _snapshot(b.model)
        with torch.no_grad():
            before = b.model.encode_image(x_stock)
        clipviz.explain(b, [random_image(3)], ["a dog", "a cat"])
        with torch.no_grad():
            after = b.model.encode_image(x_stock)
        assert torch.equal(before, after)
        for k, v in b.model.state_dict().items():
            assert torch.equal(v, before_state[k]), k
        assert all(p.grad is None and not p.requires_grad for p in b.model.parameters())


def test_resolution_interpolates_positions_and_grows_the_grid(tiny_weights):
    config, weights = tiny_weights["vit"]
    b = clipviz.load_model(model_config=config, pretrained=str(weights), resolution=128)
    assert b.input_size == (128, 128)
    exp = clipviz.explain(b, [random_image(0)], ["a dog"])
    assert exp.maps.shape == (1, 1, 8, 8)

    pos = b.model.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(64, -1)
    x = b.vit.embed(torch.zeros(1, 3, 128, 128))
    v = b.model.visual
    with torch.no_grad():
        manual = v.ln_pre(
            torch.cat(
                [
                    v.class_embedding.view(1, 1, -1),
                    v.conv1(torch.zeros(1, 3, 128, 128)).flatten(2).transpose(1, 2),
                ],
                1,
            )
            + torch.cat([pos[:1], expected])
        )
    torch.testing.assert_close(x, manual)


def test_rn_resolution_must_be_a_multiple_of_32(tiny_weights):
    config, weights = tiny_weights["rn"]
    with pytest.raises(ClipvizError, match="multiple of 32"):
        clipviz.load_model(model_config=config, pretrained=str(weights), resolution=100)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_torch_state_dict_files_load_like_safetensors(tmp_path, tiny_weights, suffix):
    config, weights = tiny_weights["vit"]
    path = save_random_weights(config, tmp_path / f"w{suffix}", seed=0)
    a = clipviz.load_model(model_config=config, pretrained=str(path))
    b = clipviz.load_model(model_config=config, pretrained=str(weights))
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)


def test_pickled_objects_in_weights_are_refused(tmp_path, tiny_weights):
    config, _ = tiny_weights["vit"]
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": time.struct_time((0,) * 9)}, path)
    with pytest.raises(ClipvizError, match="pickled Python objects") as e:
        clipviz.load_model(model_config=config, pretrained=str(path))
    assert "weights_only" not in str(e.value)  # not torch's advice to unpickle anyway


def test_weights_of_another_architecture_are_a_clear_error(tiny_weights):
    config, _ = tiny_weights["vit"]
    _, rn_weights = tiny_weights["rn"]
    with pytest.raises(ClipvizError, match="matches the weights") as e:
        clipviz.load_model(model_config=config, pretrained=str(rn_weights))
    assert e.value.exit_code == 2


def test_unknown_model_suggests_close_names():
    with pytest.raises(ClipvizError, match="Did you mean: ViT-B-16"):
        clipviz.load_model("ViT-B16", pretrained="random")


def test_unknown_tag_lists_the_model_tags():
    with pytest.raises(ClipvizError, match="laion2b_s34b_b88k"):
        clipviz.load_model("ViT-B-16", pretrained="no-such-tag")


def test_broken_model_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ClipvizError, match="not valid UTF-8 JSON .*; fix the file, or save it as"):
        clipviz.load_model(model_config=bad, pretrained="random")
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ClipvizError, match="vision_cfg"):
        clipviz.load_model(model_config=bad, pretrained="random")


def test_offline_tag_without_cache_fails_without_trying_to_download(monkeypatch, tmp_path):
    import open_clip.pretrained

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download while offline")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_download)
    monkeypatch.setattr("clipviz.backend.hub.cached_hf_file", lambda repo, names: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipvizError, match="`pretrained` PATH") as e:
        clipviz.load_model("ViT-B-16", pretrained="openai")
    assert "ViT-B-16/openai" in str(e.value) and e.value.exit_code == 2


def test_unreachable_hub_is_detected_without_retries(monkeypatch):
    import open_clip.pretrained

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("clipviz.backend.hub.cached_hf_file", lambda repo, names: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: refused at once
    with pytest.raises(ClipvizError, match="cannot be reached"):
        clipviz.load_model("RN50", pretrained="openai")


def test_default_weights_of_vit_b_16_are_the_quickgelu_openai_ones(monkeypatch):
    seen = {}

    def fake_weights(model, tag, cfg):
        seen.update(model=model, tag=tag, quick_gelu=cfg.get("quick_gelu"))
        raise ClipvizError("stop here")

    monkeypatch.setattr("clipviz.backend.hub.tag_weights_file", fake_weights)
    with pytest.raises(ClipvizError, match="stop here"):
        clipviz.load_model()
    assert seen == {"model": "ViT-B-16", "tag": "openai", "quick_gelu": True}


def test_explicit_attention_reproduces_the_stock_block(vit_backend):
    b = vit_backend
    x = b.vit.embed(_batch(b))
    for i, block in enumerate(b.model.visual.transformer.resblocks):
        with torch.no_grad():
            stock = block(x)
            explicit, probs = b.vit.block_with_attention(i, x)
            # nn.MultiheadAttention's own weights, averaged over heads, as an independent check
            _, mha = block.attn(*(block.ln_1(x),) * 3, need_weights=True)
        torch.testing.assert_close(explicit, stock, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.mean(dim=1), mha, atol=1e-5, rtol=1e-5)
        x = stock


def test_adapters_are_asked_by_priority_and_an_unmatched_tower_is_a_usage_error(monkeypatch):
    from clipviz.backend import towers

    monkeypatch.setattr(towers, "_ADAPTERS", list(towers.adapters()))

    class Striped(torch.nn.Module):
        pass

    @towers.register_adapter(lambda visual: isinstance(visual, Striped))
    def broad(visual, memo, name):
        return "broad"

    with pytest.raises(ClipvizError, match=r"^tiny: the image tower Identity is not supported"):
        towers.tower_adapter(torch.nn.Identity(), lambda key, build: build(), "tiny")
    assert towers.tower_adapter(Striped(), lambda key, build: build(), "tiny") == "broad"

    @towers.register_adapter(lambda visual: getattr(visual, "narrow", False), priority=1)
    def narrow(visual, memo, name):
        return "narrow"

    visual = Striped()
    visual.narrow = True
    assert towers.tower_adapter(visual, lambda key, build: build(), "tiny") == "narrow"
    assert towers.tower_adapter(Striped(), lambda key, build: build(), "tiny") == "broad"
