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
