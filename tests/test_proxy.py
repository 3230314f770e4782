"""Proxy models (`clipviz.segment.proxy`): random-weight timm ViTs saved to files and loaded
back give the same tokens and attention; DINO's position interpolation; specs that name
nothing loadable are one-line usage errors."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from clipviz import ClipvizError
from clipviz.backend import hub
from clipviz.segment.proxy import dino_positions, load_proxy, proxy_stamp

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny DINO-like ViT/8 and a DINOv2-like ViT/14 with 4 registers and LayerScale
TINY = {
    "dino": ("vit_small_patch8_224", {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}),
    "reg4": ("vit_base_patch14_reg4_dinov2", {"depth": 2, "embed_dim": 32, "num_heads": 2,
                                              "img_size": 28}),
}  # fmt: skip


def write_proxy_folder(root, kind: str = "dino", seed: int = 0, **model_args):
    """A folder as the hub gives a timm model (config.json + model.safetensors) holding a tiny
    random ViT (`model_args` over the tiny ones); returns (folder, the model)."""
    architecture, args = TINY[kind]
    args = {**args, **model_args}
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **args).eval()
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "model.safetensors"))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    config = {"architecture": architecture, "model_args": args,
              "pretrained_cfg": {"mean": mean, "std": std}}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    return root, model


@pytest.mark.parametrize("kind", ["dino", "reg4"])
def test_a_saved_proxy_loads_back_with_the_same_tokens_and_attention(tmp_path, kind):
    folder, model = write_proxy_folder(tmp_path / kind, kind)
    proxy = load_proxy(str(folder))
    size = TINY[kind][1]["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.forward_features(x)  # at the trained size: timm's own positions
    assert proxy.prefix == (5 if kind == "reg4" else 1)
    torch.testing.assert_close(proxy.tokens(x), reference[:, proxy.prefix :])
    # the last block's attention, from timm's unfused forward
    seen = {}
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("probs", o))
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    torch.testing.assert_close(proxy.attention(x), seen["probs"])
    assert proxy.attention(x).shape == (
        2,
        2,
        proxy.prefix + proxy.grid(size, size)[0] ** 2,
        proxy.prefix + proxy.grid(size, size)[0] ** 2,
    )
    # a weights file inside the folder names the same proxy
    torch.testing.assert_close(load_proxy(str(folder / "model.safetensors")).tokens(x),
                               proxy.tokens(x))  # fmt: skip


def test_other_sizes_take_dinos_positions_and_pixels_past_the_last_patch_are_not_seen(tmp_path):
    folder, model = write_proxy_folder(tmp_path / "dino")
    proxy = load_proxy(str(folder))
    assert proxy.patch_size == (8, 8) and proxy.grid(45, 30) == (5, 3)
    x = torch.randn(1, 3, 45, 30, generator=torch.Generator().manual_seed(2))
    tokens = proxy.tokens(x)
    assert tokens.shape == (1, 15, 32)
    torch.testing.assert_close(proxy.tokens(x[..., :40, :24]), tokens)
    # the forward written out with DINO's interpolation of the 4x4 positions to 5x3
    pos = model.pos_embed[0].detach()
    grid = pos[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    resized = F.interpolate(
        grid, scale_factor=(5.1 / 4, 3.1 / 4), mode="bicubic", align_corners=False
    )
    with torch.no_grad():
        patches = model.patch_embed.proj(x[..., :40, :24]).flatten(2).transpose(1, 2)
        stream = torch.cat(
            [model.cls_token + pos[:1], patches + resized.flatten(2).transpose(1, 2)], 1
        )
        expected = model.norm(model.blocks(stream))[:, 1:]
    torch.testing.assert_close(tokens, expected)
    # not timm's own resampling (antialiased, to the size): the two differ
    with torch.no_grad():
        timm_way = timm.layers.resample_abs_pos_embed(pos[None, 1:], (5, 3), (4, 4), 0)[0]
    assert (timm_way - dino_positions(pos[1:], (4, 4), (5, 3))).abs().max() > 1e-4


def test_renormalize_turns_clip_inputs_into_the_proxys():
    proxy_mean, proxy_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pixels = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    clip_in = (pixels - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(
        1, 3, 1, 1
    )
    model = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0,
                              dynamic_img_size=True, **TINY["dino"][1])  # fmt: skip
    from clipviz.segment.proxy import Proxy

    proxy = Proxy(model, "tiny", proxy_mean, proxy_std)
    expected = (pixels - torch.tensor(proxy_mean).view(1, 3, 1, 1)) / torch.tensor(proxy_std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(proxy.renormalize(clip_in, clip_mean, clip_std), expected)


def test_name_equals_file_loads_weights_for_a_timm_architecture(tmp_path):
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    proxy = load_proxy(f"vit_tiny_patch16_224={path}")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(proxy.tokens(x), model.forward_features(x)[:, 1:])
    assert proxy.mean == (0.5, 0.5, 0.5)  # the architecture's own normalisation
    assert proxy_stamp(f"vit_tiny_patch16_224={path}")[1:] != ()


def _fails(spec: str, *words: str) -> str:
    with pytest.raises(ClipvizError) as e:
        load_proxy(spec)
    text = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in text, text
    for word in words:
        assert word in text, text
    return text


def test_specs_that_name_nothing_loadable_are_one_line_usage_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "cached_hf_file", lambda repo, names: None)  # nothing cached
    _fails("vit_base_patch8_224.dino", "offline", "vit_base_patch8_224.dino=FILE.safetensors",
           "config.json")  # fmt: skip
    _fails("no_such_model.dino", "timm has no model 'no_such_model.dino'")
    _fails(str(tmp_path / "missing.safetensors"), "no such file or folder; check the path")
    folder, _ = write_proxy_folder(tmp_path / "p")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "w.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    _fails(str(tmp_path / "bare" / "w.safetensors"), "NAME=FILE", "vit_base_patch8_224.dino=")
    _fails(str(tmp_path / "bare"), "no config.json")
    # weights saved from another architecture
    _fails(f"vit_tiny_patch16_224={tmp_path / 'bare' / 'w.safetensors'}", "do not fit")
    (tmp_path / "broken.safetensors").write_bytes(b"not weights")
    _fails(f"vit_tiny_patch16_224={tmp_path / 'broken.safetensors'}", "cannot read")
    _fails(f"vit_tiny_patch16_224={tmp_path / 'nowhere.safetensors'}", "no weights file")
    # a model that is not a ViT
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "config.json").write_text(json.dumps({"architecture": "resnet10t"}))
    (tmp_path / "conv" / "model.safetensors").write_bytes(b"")
    _fails(str(tmp_path / "conv"), "cannot build resnet10t", "name a ViT")


def test_proxy_folders_that_cannot_be_used_say_how_to_fix_them(tmp_path):
    folder, model = write_proxy_folder(tmp_path / "p")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architecture": None}))
    _fails(str(folder), "names no `architecture`", '"architecture": "vit_base_patch8_224.dino"')
    odd = {**config, "pretrained_cfg": {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}}
    (folder / "config.json").write_text(json.dumps(odd))
    _fails(str(folder), "not three channels' values", "three means and three positive stds")
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    state["cls_token"][0, 0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    _fails(str(folder), "not finite", "use other weights")
    torch.save({"weights": 1}, folder / "odd.pt")
    _fails(str(folder / "odd.pt"), "no plain table of weights", "state_dict()")
