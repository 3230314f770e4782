"""Refusals say what to do, not only what is wrong: each message here is reached the way a user
reaches it, and must name the way out (the fix, the command or the option to use)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from clipviz import ClipvizError


def _refused(call, *args, **kwargs) -> str:
    with pytest.raises(ClipvizError) as e:
        call(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text, text
    return text


# models and weights


def test_an_unknown_architecture_points_at_clipviz_models():
    from clipviz.backend.support import architecture_support

    text = _refused(architecture_support, "No-Such-Arch")
    assert "`clipviz models` lists" in text and "`model_config` FILE.json" in text


def test_a_weights_index_naming_absent_shards_says_to_copy_or_resave(tmp_path):
    from clipviz.backend.hf_load import weights_files

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    found = {"model.safetensors.index.json": index}
    text = _refused(weights_files, found.get, "tiny")
    assert "which are absent" in text and "copy the folder again" in text
    assert "save_pretrained" in text


def test_weights_that_are_not_a_dict_say_to_save_the_state_dict(tmp_path):
    from clipviz.backend.hf_load import read_state_dict

    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    text = _refused(read_state_dict, path)
    assert "hold a list, not a state dict" in text and "model.state_dict()" in text


def test_a_tower_without_a_projection_names_what_needs_one():
    from clipviz.backend.hf import HFViTTower
    from clipviz.backend.timm_head import TimmHead

    hf = HFViTTower.__new__(HFViTTower)
    hf.visual, hf._name = SimpleNamespace(projection=None), "tiny"
    text = _refused(lambda: hf.proj)
    assert "ECLIP and TextSpan need one" in text
    head = TimmHead.__new__(TimmHead)
    head.visual = SimpleNamespace(head=SimpleNamespace(proj=None))
    head.trunk, head._name = SimpleNamespace(head=torch.nn.Identity()), "tiny"
    text = _refused(lambda: head.proj)
    assert "no linear projection" in text and "ECLIP and TextSpan need one" in text


def test_an_unsupported_patch_embedding_points_at_clipviz_models():
    from clipviz.backend.timm_vit import TimmViTTower

    trunk = SimpleNamespace(blocks=[], patch_embed=torch.nn.Identity())
    text = _refused(TimmViTTower, SimpleNamespace(trunk=trunk), None, "tiny")
    assert "patch embedding Identity is not supported" in text and "`clipviz models`" in text


# ECLIP checkpoints


def _checkpoint(path: Path, metadata: dict[str, str], **tensors: torch.Tensor) -> Path:
    save_file(tensors or {"head.bias": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def test_eclip_checkpoints_that_cannot_be_used_say_what_to_pass(vit_backend, tmp_path):
    from clipviz.eclip.head import base_identity, load_head

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    text = _refused(load_head, vit_backend, broken)
    assert "not a readable safetensors checkpoint" in text and "`clipviz train` wrote" in text
    bare = _checkpoint(tmp_path / "bare.safetensors", {})
    text = _refused(load_head, vit_backend, bare)
    assert "no base-model identity" in text and "`clipviz train` wrote" in text
    base = json.dumps(base_identity(vit_backend))
    misfit = _checkpoint(tmp_path / "misfit.safetensors", {"base": base},
                         **{"head.proj": torch.zeros(2, 2)})  # fmt: skip
    text = _refused(load_head, vit_backend, misfit)
    assert "does not fit this model" in text and "train it again" in text


def test_checkpoints_that_cannot_be_resumed_say_to_start_anew(vit_backend, tmp_path):
    from clipviz.eclip.head import base_identity
    from clipviz.eclip.state import load_checkpoint

    def resume(path: Path) -> str:
        return _refused(load_checkpoint, path, vit_backend, None, None, None, [], {})

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    for path in (broken, _checkpoint(tmp_path / "bare.safetensors", {})):
        text = resume(path)
        assert "start a new `out` or drop `resume`" in text, text
    base = json.dumps(base_identity(vit_backend))
    final = _checkpoint(tmp_path / "final.safetensors", {"base": base, "kind": "final"})
    text = resume(final)
    assert "holds no training state" in text and "start a new `out` or drop `resume`" in text


# WordNet and synsets


def test_a_wordnet_copy_that_fails_says_which_folder_must_be_writable(monkeypatch, tmp_path):
    from clipviz.convis import wordnet

    def refuse(source, target):
        raise PermissionError("read-only")

    monkeypatch.setattr(wordnet, "_find_in_nltk", lambda: None)
    monkeypatch.setattr(wordnet, "_system_dirs", lambda: [tmp_path])
    monkeypatch.setattr(wordnet, "_is_wordnet30", lambda folder: True)
    monkeypatch.setattr(wordnet, "_install_from_dict", refuse)
    wordnet.wordnet_root.cache_clear()
    try:
        text = _refused(wordnet.wordnet_root)
    finally:
        wordnet.wordnet_root.cache_clear()
    assert "could not copy WordNet" in text and "$CLIPVIZ_CACHE" in text


def test_an_unreadable_wordnet_says_to_delete_the_copy_not_that_none_was_found(monkeypatch):
    from clipviz.convis import nouns, wordnet

    def unreadable(root):
        raise OSError("data.noun is cut short")

    monkeypatch.setattr(wordnet, "wordnet_root", lambda: Path("/wn"))
    monkeypatch.setattr(nouns, "wordnet_root", lambda: Path("/wn"))
    monkeypatch.setattr(nouns, "_parse", unreadable)
    monkeypatch.setattr(nouns, "_db_cache_file", lambda root: Path("/nonexistent/nouns.json"))
    nouns.noun_database.cache_clear()
    try:
        text = _refused(nouns.noun_database)
    finally:
        nouns.noun_database.cache_clear()
    assert "WordNet at /wn is unreadable (data.noun is cut short)" in text
    assert "was not found" not in text and "delete that folder" in text
    monkeypatch.setattr(wordnet, "_reader_class", lambda: lambda root, omw: unreadable(root))
    wordnet.ensure_wordnet.cache_clear()
    try:
        again = _refused(wordnet.ensure_wordnet)
    finally:
        wordnet.ensure_wordnet.cache_clear()
    assert again == text


# segmentation protocol


def test_an_unknown_protocol_setting_lists_the_settings():
    from clipviz.segment.presets import get_preset, override

    text = _refused(override, get_preset("voc21", "sclip").protocol, windw=3)
    assert "unknown protocol setting(s) ['windw']" in text and "stride, window" in text


def test_an_image_too_thin_to_resize_says_to_crop_it():
    import numpy as np

    from clipviz.segment.resize import resize_image

    with pytest.raises(ClipvizError) as e:
        resize_image(np.zeros((1, 6000, 3), np.uint8), 336)
    assert e.value.exit_code == 1 and "has no pixels left" in str(e.value)
    assert "crop it" in str(e.value)
