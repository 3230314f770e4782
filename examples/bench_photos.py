"""A folder of photographs for `clipviz bench --pipeline`: crops of the example photos
(public domain, see photos/ATTRIBUTION.md) at 1024x768, flipped every other time.

    python examples/bench_photos.py /tmp/bench-photos 256
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(out: Path, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted((Path(__file__).parent / "photos").glob("*.jpg"))
    photos = [Image.open(p).convert("RGB") for p in sources]
    for i in range(n):
        photo = photos[i % len(photos)]
        rng = np.random.default_rng(i)
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((1024, 768), Image.Resampling.BICUBIC)
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(out / f"{i:05d}.jpg", quality=90)
    print(f"{n} photos in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-photos"),
         int(sys.argv[2]) if len(sys.argv) > 2 else 256)  # fmt: skip
