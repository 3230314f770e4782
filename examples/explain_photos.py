"""Explain the example photos with the default model (ViT-B-16, OpenAI weights).

    python examples/explain_photos.py [--out DIR] [clipviz model options…]

Writes overlays, heatmaps, `maps.npz` and a manifest to DIR (default `clipviz-out/examples`)
and prints, for each photo, how CLIP ranks the prompts. The same run from the shell:

    clipviz explain examples/photos "an astronaut" "a cat" "a cup of coffee" "a rocket" "a flag"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import clipviz
from clipviz.data.inputs import collect_inputs
from clipviz.runs.explain import run_explain

PHOTOS = Path(__file__).parent / "photos"
PROMPTS = ["an astronaut", "a cat", "a cup of coffee", "a rocket", "a flag"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("clipviz-out/examples"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--model-config", default=None)
    parser.add_argument("--method", default="itsm")
    args = parser.parse_args()

    try:
        model = clipviz.load_model(args.model, args.pretrained, args.model_config)
    except clipviz.ClipvizError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    items, _ = collect_inputs([str(PHOTOS)])
    texts = model.encode_texts(PROMPTS)
    summary = run_explain(model, items, texts, args.out, methods=[args.method], overwrite=True)
    for rec in summary.records:
        if rec["status"] == "failed":
            print(f"{rec['output']:>14}: failed ({rec['error']})")
            continue
        ranked = sorted(rec["probs"].items(), key=lambda kv: -kv[1])
        print(f"{rec['output']:>14}: " + ", ".join(f"{p} {v:.2f}" for p, v in ranked[:3]))
    print(f"outputs in {args.out}/ (open the *.overlay.png files)")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
