"""The image-tower kinds: their words, and the former word `vit` read as `tokens`."""

from __future__ import annotations

import ast

import pytest

from clipviz.backend.towers import MAP, RESNET, TOKENS
from clipviz.methods import catalog as catalog_module
from clipviz.methods import registry
from clipviz.tower_kinds import tower_kind


def test_the_token_stream_kind_is_called_tokens():
    assert (TOKENS, RESNET, MAP) == ("tokens", "rn", "conv") == registry.TOWERS
    assert tower_kind("vit") == TOKENS and tower_kind(RESNET) == RESNET


def test_a_method_registered_with_the_former_word_vit_runs_on_token_towers():
    def kk(backend, images, texts):  # registered as a method module of an earlier version would
        raise AssertionError

    kk.__qualname__ = "test_tower_kinds.kk"
    try:
        registry.register(
            "kk-former-word", towers=("vit", "rn"), needs={"vit": ("attention",)},
            summary="s", citation="c", reference="r",
        )(kk)  # fmt: skip
        info = registry._REGISTRY["kk-former-word"].info
    finally:
        registry._REGISTRY.pop("kk-former-word", None)
    assert info.towers == (TOKENS, RESNET) and info.needs == ((TOKENS, ("attention",)),)
    assert info.fits(TOKENS, frozenset({"attention"})) and not info.fits(TOKENS, frozenset())


def test_unknown_tower_kinds_are_refused_at_registration():
    with pytest.raises(ValueError, match="unknown towers"):
        registry.register("kk-unknown", towers=("cnn",), summary="s", citation="c", reference="r")


@pytest.mark.parametrize(
    "source",
    [
        "register('m', towers=(TOKENS, MAP), needs={TOKENS: ('attention',)}, summary='s', "
        "citation='c', reference='r')",
        "register('m', towers=(tower_kinds.TOKENS, 'conv'), needs={'vit': ('attention',)}, "
        "summary='s', citation='c', reference='r')",
    ],
)
def test_the_catalogue_reads_kinds_named_by_their_constants(source):
    call = ast.parse(source, mode="eval").body
    fn = ast.parse("def m(backend, images, texts):\n    '''m.'''\n").body[0]
    info = catalog_module._info(fn, call)
    assert info.towers == (TOKENS, MAP) and info.needs == ((TOKENS, ("attention",)),)
