"""Tiny transformers CLIP and SigLIP models with random weights and tokenizers built here
(no download): a byte-level BPE for CLIP, a sentencepiece unigram model for SigLIP."""

from __future__ import annotations

import io
from pathlib import Path

CORPUS = [
    "a photo of a cat", "a photo of a dog", "a red square", "a square on grass",
    "a cat on a sofa", "two dogs in the grass", "a red car", "a blue sky",
]  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=64, patch_size=16)  # fmt: skip
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)  # fmt: skip


def _clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT["max_position_embeddings"])


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=VISION, projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    image = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(folder)
    return folder


def write_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import (
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=48,
        model_type="unigram", character_coverage=1.0, unk_id=2, eos_id=1, pad_id=0, bos_id=-1,
        unk_piece="<unk>", eos_piece="</s>", pad_piece="<pad>", hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tok = SiglipTokenizer(vocab_file=str(folder / "spiece.model"),
                          model_max_length=TEXT["max_position_embeddings"])  # fmt: skip
    config = SiglipConfig(
        text_config=dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None),
        vision_config=VISION,
    )  # fmt: skip
    model = SiglipModel(config).eval()
    with torch.no_grad():  # an untrained probe starts near zero: give it a direction
        model.vision_model.head.probe.normal_()
    model.save_pretrained(folder)
    image = SiglipImageProcessor(size={"height": 64, "width": 64})
    SiglipProcessor(image_processor=image, tokenizer=tok).save_pretrained(folder)
    return folder


def write_tiny_siglip2(folder: Path, seed: int = 0) -> Path:
    """A tiny `Siglip2Model` (NaFlex: 16-px patches, a budget of 16 per image) with the
    SigLIP sentencepiece tokenizer built here."""
    import torch
    from transformers import (
        Siglip2Config,
        Siglip2ImageProcessor,
        Siglip2Model,
        Siglip2Processor,
        SiglipTokenizer,
    )

    siglip = write_tiny_siglip(folder.parent / f"{folder.name}-tokenizer", seed)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tok = SiglipTokenizer(vocab_file=str(siglip / "spiece.model"),
                          model_max_length=TEXT["max_position_embeddings"])  # fmt: skip
    vision = {k: v for k, v in VISION.items() if k != "image_size"}
    config = Siglip2Config(
        text_config=dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None),
        vision_config=dict(vision, num_patches=16),
    )  # fmt: skip
    model = Siglip2Model(config).eval()
    with torch.no_grad():
        model.vision_model.head.probe.normal_()
    model.save_pretrained(folder)
    image = Siglip2ImageProcessor(patch_size=16, max_num_patches=16)
    Siglip2Processor(image_processor=image, tokenizer=tok).save_pretrained(folder)
    return folder


# -- folders shaped as the hub publishes them ---------------------------------------------------
#
# config.json, tokenizer_config.json, special_tokens_map.json and preprocessor_config.json carry
# the published keys and values of each repository (read from the hub pages of the repository
# or of its verbatim mirrors), except:
# - widths, depths and vocabularies are shrunk (SHRINK, and token ids that follow the vocabulary)
#   so that the weights are tiny; image sizes, patch sizes and text lengths are the published ones;
# - where a published file could not be read, transformers' documented defaults for the class
#   stand in: google/siglip2-base-patch16-224's tokenizer files (Gemma's tokenizer as the
#   SigLIP2 conversion configures it: no BOS, EOS appended, right padding, lower case, and the
#   `model_max_length` Gemma publishes, 1e30), its preprocessor_config.json (SigLIP's processor
#   at 224 x 224, mean and std 0.5), and the special_tokens_map.json of every repository
#   (the tokenizer's own special tokens).
# The tokenizers' vocabularies are built here (no download) with the published special tokens.

SHRINK = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_CLIP_SPECIAL = dict(content="", single_word=False, lstrip=False, rstrip=False, normalized=True)


def _clip_special(content: str) -> dict:
    return {**_CLIP_SPECIAL, "content": content, "__type": "AddedToken"}


def _clip_vocab_files(folder: Path) -> int:
    """vocab.json and merges.txt of a byte-level BPE whose special tokens come last, as in
    CLIP's own vocabulary (start 49406, end 49407): the end-of-text id is the largest.
    Returns the vocabulary size."""
    import json

    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in ("ph", "pho", "phot", "photo</w>", "of</w>", "at</w>", "cat</w>"):
        vocab.setdefault(word, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = ["p h", "ph o", "pho t", "phot o</w>", "o f</w>", "a t</w>", "c at</w>"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def _clip_tokenizer_files(folder: Path, name_or_path: str) -> int:
    """CLIP's tokenizer files as openai/clip-vit-base-patch32 published them (and the other
    CLIP repositories copied): 77 tokens, lower case, end-of-text as padding."""
    size = _clip_vocab_files(folder)
    end = _clip_special("<|endoftext|>")
    _write_json(folder / "tokenizer_config.json", {
        "unk_token": end, "bos_token": _clip_special("<|startoftext|>"), "eos_token": end,
        "pad_token": "<|endoftext|>", "add_prefix_space": False, "errors": "replace",
        "do_lower_case": True, "name_or_path": name_or_path, "model_max_length": 77,
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
    })  # fmt: skip
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": {k: v for k, v in _clip_special("<|startoftext|>").items() if k != "__type"},
        "eos_token": {k: v for k, v in end.items() if k != "__type"},
        "unk_token": {k: v for k, v in end.items() if k != "__type"},
        "pad_token": "<|endoftext|>",
    })  # fmt: skip
    return size


def _clip_preprocessor(folder: Path) -> None:
    _write_json(folder / "preprocessor_config.json", {
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "resample": 3, "size": 224,
    })  # fmt: skip


def _write_json(path: Path, data: dict) -> None:
    import json

    path.write_text(json.dumps(data, indent=2))


def _save_weights(config: dict, folder: Path, seed: int, file: str = "model.safetensors") -> None:
    """Seeded random weights of the model `config` describes, saved as the repository does
    (safetensors, or a torch state dict of tensors alone as `pytorch_model.bin`)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    _write_json(folder / "config.json", config)
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder)).eval()
    head = getattr(model.vision_model, "head", None)
    if head is not None:  # an untrained probe starts near zero: give it a direction
        with torch.no_grad():
            head.probe.normal_()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if file.endswith(".safetensors"):
        save_file(state, str(folder / file), metadata={"format": "pt"})
    else:
        torch.save(state, folder / file)


def _clip_hub(folder: Path, config: dict, name_or_path: str, seed: int, file: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _clip_tokenizer_files(folder, name_or_path)
    end, start = vocab - 1, vocab - 2
    text = config["text_config"]
    text.update(SHRINK, vocab_size=vocab)
    if text.get("eos_token_id") != 2:  # 2: the legacy marker (pool at the largest id) stays
        text.update(bos_token_id=start, eos_token_id=end)
    config["vision_config"].update(SHRINK)
    config["projection_dim"] = 16
    _clip_preprocessor(folder)
    _save_weights(config, folder, seed, file)
    return folder


def write_openai_clip_b16(folder: Path, seed: int = 0) -> Path:
    """openai/clip-vit-base-patch16 (config.json as the hub serves it today)."""
    config = {
        "architectures": ["CLIPModel"], "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 512,
        "text_config": {"bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
                        "model_type": "clip_text_model"},
        "torch_dtype": "float32",
        "vision_config": {"dropout": 0.0, "model_type": "clip_vision_model", "patch_size": 16},
    }  # fmt: skip
    return _clip_hub(folder, config, "openai/clip-vit-base-patch32", seed, "model.safetensors")


def write_laion_clip_b32(folder: Path, seed: int = 0) -> Path:
    """laion/CLIP-ViT-B-32-laion2B-s34B-b79K: GELU towers, patch 32, the legacy token ids."""
    config = {
        "architectures": ["CLIPModel"], "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 512,
        "text_config": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                        "hidden_act": "gelu", "layer_norm_eps": 1e-05,
                        "max_position_embeddings": 77, "model_type": "clip_text_model",
                        "projection_dim": 512},
        "torch_dtype": "float32",
        "vision_config": {"hidden_act": "gelu", "image_size": 224, "layer_norm_eps": 1e-05,
                          "model_type": "clip_vision_model", "patch_size": 32,
                          "projection_dim": 512},
    }  # fmt: skip
    return _clip_hub(folder, config, "openai/clip-vit-base-patch32", seed, "model.safetensors")


def write_metaclip_b16(folder: Path, seed: int = 0) -> Path:
    """facebook/metaclip-b16-fullcc2.5b: a bare config (its `heads`/`layers` keys are not
    transformers'), the default token ids, weights as `pytorch_model.bin` only."""
    config = {
        "architectures": ["CLIPModel"], "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 512,
        "text_config": {"heads": 8, "layers": 12, "model_type": "clip_text_model"},
        "torch_dtype": "float32", "transformers_version": "4.34.0",
        "vision_config": {"model_type": "clip_vision_model", "patch_size": 16},
    }  # fmt: skip
    return _clip_hub(folder, config, "facebook/metaclip-b16-fullcc2.5b", seed, "pytorch_model.bin")


def write_siglip_b16(folder: Path, seed: int = 0) -> Path:
    """google/siglip-base-patch16-224: sentencepiece tokenizer, 64 tokens, `</s>` as padding."""
    from transformers import SiglipTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    source = write_tiny_siglip(folder.parent / f"{folder.name}-sentencepiece", seed)
    tok = SiglipTokenizer(vocab_file=str(source / "spiece.model"))
    (folder / "spiece.model").write_bytes((source / "spiece.model").read_bytes())
    _write_json(folder / "tokenizer_config.json", {
        "additional_special_tokens": [], "clean_up_tokenization_spaces": True,
        "do_lower_case": True, "eos_token": "</s>", "model_input_names": ["input_ids"],
        "model_max_length": 64, "pad_token": "</s>", "processor_class": "SiglipProcessor",
        "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer", "unk_token": "<unk>",
    })  # fmt: skip
    _write_json(folder / "special_tokens_map.json",
                {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})  # fmt: skip
    _write_json(folder / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5] * 3,
        "processor_class": "SiglipProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224},
    })  # fmt: skip
    config = {
        "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
        "text_config": {**SHRINK, "model_type": "siglip_text_model", "vocab_size": len(tok),
                        "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id},
        "vision_config": {**SHRINK, "model_type": "siglip_vision_model", "patch_size": 16},
    }  # fmt: skip
    _save_weights(config, folder, seed)
    return folder


def write_siglip2_b16(folder: Path, seed: int = 0) -> Path:
    """google/siglip2-base-patch16-224: SigLIP's architecture (FixRes, `model_type` siglip)
    with Gemma's tokenizer, whose published `model_max_length` is 1e30: the text length comes
    from the model's 64 positions."""
    from transformers import GemmaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab["▁" + ch] = len(vocab)
    GemmaTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": True, "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False, "do_lower_case": True, "eos_token": "<eos>",
        "mask_token": "<mask>", "model_input_names": ["input_ids"],
        "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>",
        "padding_side": "right", "processor_class": "SiglipProcessor",
        "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
    })  # fmt: skip
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": "<bos>", "eos_token": "<eos>", "mask_token": "<mask>",
        "pad_token": "<pad>", "unk_token": "<unk>",
    })  # fmt: skip
    _write_json(folder / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5] * 3,
        "processor_class": "SiglipProcessor", "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224},
    })  # fmt: skip
    config = {
        "initializer_factor": 1.0, "model_type": "siglip",
        "text_config": {**SHRINK, "model_type": "siglip_text_model", "vocab_size": len(vocab),
                        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
        "transformers_version": "4.49.0.dev0",
        "vision_config": {**SHRINK, "model_type": "siglip_vision_model"},
    }  # fmt: skip
    _save_weights(config, folder, seed)
    return folder


HUB_SHAPED = {
    "openai/clip-vit-base-patch16": write_openai_clip_b16,
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K": write_laion_clip_b32,
    "google/siglip-base-patch16-224": write_siglip_b16,
    "google/siglip2-base-patch16-224": write_siglip2_b16,
    "facebook/metaclip-b16-fullcc2.5b": write_metaclip_b16,
}
