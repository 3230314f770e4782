"""The images the app offers as examples: the repository's example photos (when clipviz runs
from a checkout) and scenes of the synthetic world, written once to a folder."""

from __future__ import annotations

import os
from pathlib import Path

PHOTOS = Path(__file__).resolve().parents[3] / "examples" / "photos"


def testbed_cache() -> Path:
    """Where the test bed's tiny CLIP is cached (as `make demo` and the tests use it)."""
    env = os.environ.get("CLIPVIZ_TESTBED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "clipviz-testbed"


def example_images(folder: Path, scenes: int = 4) -> list[Path]:
    """Example photos, then `scenes` held-out test-bed scenes saved as PNGs in `folder`
    (scaled up 4x so that they are visible; the models resize them anyway)."""
    from PIL import Image

    from ..testbed.world import make_scenes

    photos = sorted(p for p in PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, scene in enumerate(make_scenes(scenes, seed=9_001)):
        path = folder / f"testbed-scene-{i}.png"
        if not path.is_file():
            image = Image.fromarray(scene.image).resize((256, 256), Image.Resampling.NEAREST)
            image.save(path)
        written.append(path)
    return photos + written
