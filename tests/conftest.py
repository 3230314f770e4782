"""Shared fixtures: tiny open_clip models with random weights saved to files, loaded through
the same path a user's weights take (`--model-config` + `--pretrained FILE`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm_tiny  # noqa: F401  (registers the tiny timm towers the configs name)
import torch
from PIL import Image

CONFIGS = Path(__file__).parent / "configs"

# Tests never touch the user's caches, and never the network.
_CACHE = tempfile.mkdtemp(prefix="clipviz-test-cache-")
os.environ["CLIPVIZ_CACHE"] = _CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)


# Test modules whose subject reads open_clip's modules (the tower adapters, the text tower, the
# loaders, and the references that hook open_clip's blocks): `make test-compat` runs only these
# (`-m open_clip`) under the oldest open_clip that pyproject.toml admits. A test elsewhere that
# reads open_clip's internals carries `@pytest.mark.open_clip` itself.
OPEN_CLIP_MODULES = frozenset({
    "test_attention_stages", "test_backend", "test_eclip", "test_families", "test_gradeclip",
    "test_gradients", "test_methods", "test_rollout", "test_selfattention", "test_speed",
    "test_support", "test_surgery", "test_textspan",
})  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "open_clip: reads open_clip's internals; also run under the oldest open_clip"
    )
    workers = getattr(config.option, "numprocesses", None)
    if hasattr(config, "workerinput"):
        # a pytest-xdist worker: the cores are shared out between the workers
        total = int(config.workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // total))
    elif workers:
        # the pytest-xdist controller, before its workers start: the test bed's models are
        # trained once here (and cached) instead of by each worker that asks for them
        train_testbed_models()


def train_testbed_models() -> None:
    """The test bed's tiny CLIP and SigLIP and the second world's CLIP, trained into the cache
    where missing: the last in a process of its own meanwhile (it trains on one thread).
    `make test` runs this (`python tests/conftest.py`) beside the linters."""
    import subprocess
    import sys

    from clipviz.testbed.tinyclip import ensure_tiny_clip
    from clipviz.testbed.tinysiglip import ensure_tiny_siglip

    second = subprocess.Popen(
        [sys.executable, "-c", "import sys; "
         "from clipviz.testbed.tinyclip import ensure_tiny_clip; "
         "ensure_tiny_clip(sys.argv[1], seed=int(sys.argv[2]))",
         str(testbed_cache()), str(SECOND_WORLD)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    ensure_tiny_clip(testbed_cache())
    ensure_tiny_siglip(testbed_cache())
    if second.wait() != 0:
        raise RuntimeError("training the second world's tiny CLIP failed (see above)")


# Of the method contract's cases over every (method, family), the oldest open_clip runs every
# method on every family (its maps are finite, of the right shape); these two run under it only
# on the families whose blocks are open_clip's own (elsewhere open_clip only wraps a timm trunk,
# the same timm in both runs): a batch equals its images one by one (the method's arithmetic),
# and the model stays as loaded
COMPAT_FAMILIES_ONLY = {
    "test_a_batch_gives_the_maps_of_its_images_one_by_one": frozenset(),
    "test_the_model_its_forward_and_its_weights_stay_as_loaded": frozenset({"vit", "rn", "coca"}),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        # the cases of a Hugging Face transformers tower (ids "…-hf-clip]") read no open_clip
        if module is None or module.__name__ not in OPEN_CLIP_MODULES or "-hf-" in item.name:
            continue
        families = COMPAT_FAMILIES_ONLY.get(getattr(item, "originalname", ""))
        if families is not None and item.callspec.params.get("tower") not in families:
            continue
        item.add_marker(pytest.mark.open_clip)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models: on a busy machine, waking torch's second intra-op thread costs far more
    than the work (up to 100x), and equal thread counts keep repeated runs bitwise equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


def save_random_weights(config: Path, path: Path, seed: int = 0) -> Path:
    """Build the architecture in `config` with seeded random weights and save its state dict."""
    from safetensors.torch import save_file

    from clipviz.backend import load_backend

    torch.manual_seed(seed)
    backend = load_backend(model_config=config, pretrained="random", device="cpu", text_cache=False)
    pool = getattr(getattr(backend.model.visual, "trunk", None), "attn_pool", None)
    if pool is not None:  # timm starts the MAP probe at zero: it would attend uniformly
        with torch.no_grad():
            pool.latent.normal_(generator=torch.Generator().manual_seed(seed))
    state = {k: v.detach().contiguous().clone() for k, v in backend.model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# one tiny model per image-tower family: open_clip's ViT and ModifiedResNet, then timm towers
# through open_clip's TimmModel — a ViT with a MAP head (SigLIP's), PE-Core (EVA blocks with
# rotary positions and a MAP head that sees the class token), EVA-02 (class token), ConvNeXt
# (a pooled feature map), FastViT (MobileCLIP's MCi) and Swin (attention in the last stage),
# a relative-position ViT and a ViT with register tokens (the last three registered with timm
# by `timm_tiny`)
FAMILIES = ("vit", "rn", "map", "pe", "eva", "convnext", "fastvit", "coca", "swin", "relpos", "reg4")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """family -> (config JSON, safetensors weights), random weights saved to a file."""
    root = tmp_path_factory.mktemp("weights")
    return {
        family: (
            CONFIGS / f"tiny-{family}.json",
            save_random_weights(
                CONFIGS / f"tiny-{family}.json", root / f"tiny-{family}.safetensors", seed=i
            ),
        )
        for i, family in enumerate(FAMILIES)
    }


@pytest.fixture(scope="session")
def family_backends(tiny_weights):
    """family -> a loaded backend (built on first use)."""
    from clipviz.backend import load_backend

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            if family in HF_FAMILIES:
                cache[family] = load_backend(f"transformers:{hf_dirs()[family]}", device="cpu")
            else:
                config, weights = tiny_weights[family]
                cache[family] = load_backend(
                    model_config=config, pretrained=str(weights), device="cpu"
                )
        return cache[family]

    return get


HF_FAMILIES = ("hf-clip", "hf-siglip", "hf-siglip2")
_HF_DIRS: dict[str, Path] = {}


def hf_dirs() -> dict[str, Path]:
    """family -> a folder holding a tiny transformers model written by save_pretrained."""
    if not _HF_DIRS:
        from hf_tiny import write_tiny_clip, write_tiny_siglip, write_tiny_siglip2

        root = Path(_CACHE) / "transformers"
        _HF_DIRS["hf-clip"] = write_tiny_clip(root / "tiny-clip")
        _HF_DIRS["hf-siglip"] = write_tiny_siglip(root / "tiny-siglip")
        _HF_DIRS["hf-siglip2"] = write_tiny_siglip2(root / "tiny-siglip2")
    return _HF_DIRS


@pytest.fixture(scope="session")
def vit_backend(tiny_weights):
    from clipviz.backend import load_backend

    config, weights = tiny_weights["vit"]
    return load_backend(model_config=config, pretrained=str(weights), device="cpu")


@pytest.fixture(scope="session")
def rn_backend(tiny_weights):
    from clipviz.backend import load_backend

    config, weights = tiny_weights["rn"]
    return load_backend(model_config=config, pretrained=str(weights), device="cpu")


@pytest.fixture(params=["vit", "rn"])
def backend(request):
    return request.getfixturevalue(f"{request.param}_backend")


def subprocess_env() -> dict[str, str]:
    """The environment of a clipviz child process in a test: one thread, no warnings, gloo
    on the loopback interface."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip


def torchrun_two(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node 2 -m clipviz ARGS`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "clipviz", *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def random_image(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A noise image of `size` (width, height) with a bright square, so maps are not flat."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[10:40, 20:50] = (250, 30, 30)
    return Image.fromarray(arr)


def testbed_cache() -> Path:
    """Where the trained tiny CLIP is cached between test sessions (trained once per change
    of its code or config; about a minute and a half on 2 CPU cores)."""
    env = os.environ.get("CLIPVIZ_TESTBED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "clipviz-testbed"


@pytest.fixture(scope="session")
def trained_clip():
    """The tiny CLIP trained on the synthetic world: (config JSON, safetensors weights)."""
    from clipviz.testbed.tinyclip import ensure_tiny_clip

    tiny = ensure_tiny_clip(testbed_cache())
    return tiny.config_path, tiny.weights_path


@pytest.fixture(scope="session")
def trained_siglip_backend():
    """The tiny SigLIP (MAP head, sigmoid loss) trained on the synthetic world, loaded."""
    from clipviz.backend import load_backend
    from clipviz.testbed.tinysiglip import ensure_tiny_siglip

    tiny = ensure_tiny_siglip(testbed_cache())
    return load_backend(
        model_config=tiny.config_path, pretrained=str(tiny.weights_path), device="cpu"
    )


SECOND_WORLD = 1  # the world of another seed the test bed's robust claims are checked on


@pytest.fixture(scope="session")
def second_world_backend():
    """The tiny CLIP of another world (`World.from_seed(SECOND_WORLD)`: other colours, shapes
    and backgrounds), trained the same way, loaded."""
    from clipviz.backend import load_backend
    from clipviz.testbed.tinyclip import ensure_tiny_clip

    tiny = ensure_tiny_clip(testbed_cache(), seed=SECOND_WORLD)
    return load_backend(
        model_config=tiny.config_path, pretrained=str(tiny.weights_path), device="cpu"
    )


@pytest.fixture(scope="session")
def trained_backend(trained_clip):
    from clipviz.backend import load_backend

    config, weights = trained_clip
    return load_backend(model_config=config, pretrained=str(weights), device="cpu")


def write_cub(root: Path) -> Path:
    """A two-image CUB-200-2011 layout of one class; the second box is the whole image."""
    (root / "images" / "001.Bird").mkdir(parents=True)
    for i in (1, 2):
        Image.new("RGB", (96, 64), (40 * i, 90, 160)).save(
            root / "images" / "001.Bird" / f"{i}.jpg"
        )
    (root / "images.txt").write_text("1 001.Bird/1.jpg\n2 001.Bird/2.jpg\n")
    (root / "bounding_boxes.txt").write_text("1 10 8 40 30\n2 0 0 96 64\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n")
    (root / "classes.txt").write_text("1 001.Bird\n")
    return root


if __name__ == "__main__":
    train_testbed_models()
