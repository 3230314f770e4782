"""The kinds of image tower a method may be written for, as words (no torch here: the method
catalogue and `--help` read them without importing the backend).

- `TOKENS` (`"tokens"`): a token stream read block by block — ViTs, and the last stage of
  FastViT and Swin, whose global attention is read the same way.
- `RESNET` (`"rn"`): open_clip's ModifiedResNet, stages then an attention pool.
- `MAP` (`"conv"`): a tower that pools a feature map.

`backend.towers` says what each kind's adapter offers.
"""

from __future__ import annotations

TOKENS = "tokens"
RESNET = "rn"
MAP = "conv"
KINDS = (TOKENS, RESNET, MAP)

# the words earlier versions used for a kind, as read from their files and method modules
_FORMER = {"vit": TOKENS}


def tower_kind(word: str) -> str:
    """The kind `word` names, the earlier word for a kind included (`"vit"` is `"tokens"`)."""
    return _FORMER.get(word, word)
