"""The contract every registered method keeps, checked over the whole registry (a new method is
covered the moment it registers): raw finite maps `[B, T, h, w]`; a batch gives the maps of its
images one by one; the model's forward and weights unchanged and no `.grad` left; a citation,
a reference and help for every option; options checked, from the library and from `-O`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from test_proxy import write_proxy_folder
from typer.testing import CliRunner

import clipviz
from clipviz import ClipvizError
from clipviz.backend.towers import MAP, RESNET, TOKENS
from clipviz.cli import app
from clipviz.methods import get_method, method_options, methods
from clipviz.methods.catalog import catalog
from clipviz.render import load_npz

PROMPTS = ["a dog", "a square"]  # nouns, so ConVis reads them as concepts
REGISTRY = methods()
# what each test family's adapter offers (checked against the real adapters below)
FAMILY_TOWERS = {
    "vit": (TOKENS, {"attention", "readout", "class_token", "eclip", "linear_head"}),
    "rn": (RESNET, {"attention", "readout", "class_token", "eclip"}),
    "map": (TOKENS, {"attention", "readout", "probe", "eclip"}),
    "pe": (TOKENS, {"attention", "readout", "probe", "eclip"}),
    "eva": (TOKENS, {"attention", "readout", "class_token", "eclip"}),
    "convnext": (MAP, set()),
    "fastvit": (TOKENS, {"attention"}),
    "swin": (TOKENS, {"attention"}),
    "relpos": (TOKENS, {"attention", "readout", "class_token", "eclip"}),
    "reg4": (TOKENS, {"attention", "readout", "class_token", "eclip"}),
    "coca": (TOKENS, {"attention", "readout", "probe", "eclip"}),
    "hf-clip": (TOKENS, {"attention", "readout", "class_token", "linear_head", "eclip"}),
    "hf-siglip": (TOKENS, {"attention", "readout", "probe", "eclip"}),
    "hf-siglip2": (TOKENS, {"attention", "readout", "probe", "eclip"}),
}
CASES = [
    (name, family)
    for name, m in REGISTRY.items()
    for family, (tower, caps) in FAMILY_TOWERS.items()
    if m.info.fits(tower, frozenset(caps))
]
runner = CliRunner()
# what every output records the versions of
VERSIONS = {"clipviz", "open_clip", "torch", "timm", "transformers"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extra_inputs(tmp_path_factory, family_backends):
    """Options for the methods that need an input of their own: an ECLIP checkpoint (a head
    moved away from the stock projection, so its maps differ from ITSM's) and a vocabulary."""
    from clipviz.eclip.head import ExplainHead, base_identity
    from clipviz.eclip.state import save_checkpoint

    root = tmp_path_factory.mktemp("contract")
    vocab = root / "words.txt"
    vocab.write_text("dog\ncat\nsquare\ncircle\ngrass\n", encoding="utf-8")
    proxy, _ = write_proxy_folder(root / "proxy")  # a tiny random ViT/8 for ProxyCLIP and CASS
    heads: dict[str, object] = {}

    def head_for(family: str) -> str:
        if family not in heads:
            b = family_backends(family)
            head = ExplainHead(b)
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                head.proj.add_(0.05 * torch.randn(head.proj.shape, generator=g))
            heads[family] = root / f"eclip-{family}.safetensors"
            meta = {"base": json.dumps(base_identity(b), sort_keys=True), "config": "{}"}
            save_checkpoint(heads[family], head, b.model.logit_scale.detach(), 1, meta)
        return str(heads[family])

    return {
        "eclip": lambda family: {"checkpoint": head_for(family)},
        # the grid variant embeds 1,800 windows per image (its batching is tested in
        # test_convis.py); the contract runs the one-pass variant
        "convis": lambda tower: {"vocabulary": str(vocab), "variant": "dense"},
        "gscorecam": lambda tower: {"topk": 6},
        "proxyclip": lambda tower: {"proxy": str(proxy)},
        "cass": lambda tower: {"proxy": str(proxy)},
    }


def _options(extra_inputs, name, tower):
    return extra_inputs[name](tower) if name in extra_inputs else {}


def _batch(backend, n=3):
    return torch.stack([backend.preprocess(random_image(seed=10 + i)) for i in range(n)])


def test_family_capabilities_are_the_adapters_own(family_backends):
    for family, (tower, caps) in FAMILY_TOWERS.items():
        b = family_backends(family)
        assert (b.tower, set(b.vision.capabilities)) == (tower, caps), family


def test_every_method_runs_on_some_family_and_every_family_runs_itsm_and_gradcam():
    assert {name for name, _ in CASES} == set(REGISTRY)
    for family in FAMILY_TOWERS:
        assert {("itsm", family), ("gradcam", family)} <= set(CASES), family


@pytest.mark.parametrize("name,tower", CASES)
def test_maps_are_finite_float32_of_shape_b_t_h_w(family_backends, extra_inputs, name, tower):
    b = family_backends(tower)
    images = _batch(b)
    exp = clipviz.explain(b, images, PROMPTS, name, options=_options(extra_inputs, name, tower))
    assert exp.maps.dtype == torch.float32 and exp.maps.dim() == 4
    assert exp.maps.shape[:2] == (3, 2) and exp.maps.shape[2] > 1 and exp.maps.shape[3] > 1
    assert torch.isfinite(exp.maps).all()
    assert exp.scores.shape == exp.probs.shape == (3, 2)


@pytest.mark.parametrize("name,tower", CASES)
def test_a_batch_gives_the_maps_of_its_images_one_by_one(
    family_backends, extra_inputs, name, tower
):
    b = family_backends(tower)
    images = _batch(b)
    texts = b.encode_texts(PROMPTS)
    options = _options(extra_inputs, name, tower)
    # FastViT's 30 convolutional blocks round differently for a batch of 3 and of 1 (float64:
    # equal), and min-max maps of its 2x2 grid magnify that
    atol = 1e-4 if tower == "fastvit" else 1e-5
    batched = clipviz.explain(b, images, texts, name, options=options)
    for i in range(len(images)):
        single = clipviz.explain(b, images[i : i + 1], texts, name, options=options)
        torch.testing.assert_close(batched.maps[i : i + 1], single.maps, rtol=1e-4, atol=atol)
        torch.testing.assert_close(batched.scores[i : i + 1], single.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,tower", CASES)
def test_the_model_its_forward_and_its_weights_stay_as_loaded(
    family_backends, extra_inputs, name, tower
):
    b = family_backends(tower)
    images = _batch(b, 2)
    state = {k: v.detach().clone() for k, v in b.model.state_dict().items()}
    with torch.no_grad():
        before = b.model.encode_image(images)
    for prompts in (PROMPTS, PROMPTS[:1]):
        clipviz.explain(b, images, prompts, name, options=_options(extra_inputs, name, tower))
    with torch.no_grad():
        assert torch.equal(b.model.encode_image(images), before)
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None and not p.requires_grad for p in b.model.parameters())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_says_what_it_is_and_documents_its_options(name):
    info = REGISTRY[name].info
    assert info.summary and info.citation and info.reference
    assert set(info.towers) <= {TOKENS, RESNET, MAP} and info.towers
    for option in info.options:
        assert option.help, f"{name}.{option.name} has no `{option.name}: …` docstring line"
        assert option.convert(option.default) == option.default  # the default fits its type


def test_the_source_catalogue_equals_the_imported_registry():
    assert catalog() == {name: m.info for name, m in REGISTRY.items()}


def test_unknown_and_ill_typed_options_are_usage_errors_listing_the_options(vit_backend):
    image = _batch(vit_backend, 1)
    with pytest.raises(ClipvizError, match="no option 'dpeth'.*depth") as e:
        clipviz.explain(vit_backend, image, PROMPTS, "surgery", options={"dpeth": 2})
    assert e.value.exit_code == 2
    with pytest.raises(ClipvizError, match=r"layer='top' is not int.*layer: int = -1"):
        clipviz.explain(vit_backend, image, PROMPTS, "gradcam", options={"layer": "top"})
    with pytest.raises(ClipvizError, match="one of grid, stochastic, dense"):
        get_method("convis").info.bind({"variant": "windows"})
    with pytest.raises(ClipvizError, match="itsm takes no options"):
        clipviz.explain(vit_backend, image, PROMPTS, "itsm", options={"depth": 1})


def test_options_from_text_are_typed_and_routed_to_the_methods_that_have_them():
    got = method_options(
        ["gradcam", "gae", "convis"],
        ["layer=-2", "gae.start_layer=-1", "synsets=dog.n.01, cat.n.01", "variant=dense"],
    )
    assert got == {
        "gradcam": {"layer": -2},
        "gae": {"start_layer": -1},
        "convis": {"synsets": ["dog.n.01", "cat.n.01"], "variant": "dense"},
    }
    with pytest.raises(ClipvizError, match="surgery is not among the methods run"):
        method_options(["gradcam"], ["surgery.depth=2"])
    with pytest.raises(ClipvizError, match="unknown method option 'depth'.*gradcam options"):
        method_options(["gradcam"], ["depth=2"])
    with pytest.raises(ClipvizError, match="not KEY=VALUE"):
        method_options(["gradcam"], ["layer"])


def _model_args(tiny_weights):
    config, weights = tiny_weights["vit"]
    return ["--model-config", str(config), "--pretrained", str(weights), "--device", "cpu"]


def test_dash_o_sets_a_method_knob_from_the_command_line(tmp_path, tiny_weights, vit_backend):
    random_image(4).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "a.png"), "a dog", "-m", "gradcam", "-O", "layer=-2",
            "--out", str(out), "-q", *_model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = load_npz(out / "a.png" / "maps.npz")["maps"]
    x = vit_backend.preprocess(Image.open(tmp_path / "a.png"))[None]
    first_block = clipviz.explain(vit_backend, x, ["a dog"], "gradcam", options={"layer": 0})
    last_block = clipviz.explain(vit_backend, x, ["a dog"], "gradcam")
    np.testing.assert_allclose(saved, first_block.maps[0].numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(saved, last_block.maps[0].numpy(), atol=1e-4)
    run = json.loads((out / "run.json").read_text())
    assert run["options"] == {"gradcam": {"layer": -2}}
    assert run["schema_version"] == 1 and set(run["versions"]) == VERSIONS


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["-O", "dpeth=2", "-m", "surgery"],
            "unknown method option 'dpeth'; surgery options: depth",
        ),
        (["-O", "layer=top", "-m", "gradcam"], "layer='top' is not int"),
        (["--surgery-depth", "2"], "surgery is not among the methods run"),
    ],
)
def test_bad_method_options_exit_2_with_one_line(tmp_path, tiny_weights, extra, message):
    random_image(4).save(tmp_path / "a.png")
    args = ["explain", str(tmp_path / "a.png"), "a dog", "--out", str(tmp_path / "o"),
            *extra, *_model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_methods_command_lists_every_method_with_its_options():
    result = runner.invoke(app, ["methods"], terminal_width=400)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2] for line in result.output.splitlines()
            if line.count("│") > 2 and line.split("│")[1].strip() in REGISTRY}  # fmt: skip
    assert rows["rollout"].strip() == "tokens" and "vit" not in rows["rollout"]
    assert rows["itsm"].strip() == "tokens, rn, conv"
    for name, m in REGISTRY.items():
        assert name in result.output
        for option in m.options:
            assert option.name in result.output


@pytest.mark.parametrize(
    "argv", [["--help"], ["explain", "--help"], ["eval", "--help"], ["train", "--help"],
             ["methods"], ["--version"]],
)  # fmt: skip
def test_help_and_listing_methods_import_neither_torch_nor_open_clip(argv):
    code = (
        "import sys\nfrom clipviz.cli import main\nsys.argv = ['clipviz', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'open_clip', 'numpy', 'PIL') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
    )
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]


def test_explain_help_shows_defaults_and_every_method_option():
    result = runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = result.output
    assert "default: 16" in text.replace("[", "").replace("]", "")  # --batch-size
    for name, m in REGISTRY.items():
        assert name in text
        for option in m.options:
            assert f"{option.name}=" in text


def test_every_output_carries_the_schema_version_and_the_versions(tmp_path, tiny_weights):
    from safetensors import safe_open

    from clipviz.runs.manifest import latest_records
    from clipviz.testbed.world import write_captions_csv, write_voc

    random_image(4).save(tmp_path / "a.png")
    model = _model_args(tiny_weights)
    runner.invoke(app, ["explain", str(tmp_path / "a.png"), "a dog", "-o", str(tmp_path / "x"),
                        "-q", *model])  # fmt: skip
    write_voc(tmp_path / "voc", 2, seed=1, size=64)
    runner.invoke(app, ["eval", str(tmp_path / "voc"), "--metric", "msc", "--json",
                        str(tmp_path / "e.json"), "-q", *model])  # fmt: skip
    write_captions_csv(tmp_path / "world", 16, seed=2, size=64)
    runner.invoke(app, ["train", str(tmp_path / "world" / "captions.csv"), "--out",
                        str(tmp_path / "t"), "-b", "8", "--steps", "1", "--workers", "0", "-q",
                        *model])  # fmt: skip
    (record,) = latest_records(tmp_path / "x").values()
    with safe_open(str(tmp_path / "t" / "eclip.safetensors"), framework="pt") as f:
        checkpoint = json.loads(f.metadata()["provenance"])
    outputs = [
        json.loads((tmp_path / "x" / "run.json").read_text()),
        record,
        json.loads((tmp_path / "e.json").read_text()),
        json.loads((tmp_path / "e.records.jsonl").read_text().splitlines()[0]),
        json.loads((tmp_path / "t" / "run.json").read_text()),
        checkpoint,
    ]
    for out in outputs:
        assert out["schema_version"] == 1
        assert set(out["versions"]) == VERSIONS
        assert out["versions"]["clipviz"] == clipviz.__version__
