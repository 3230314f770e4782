"""Reproduce the README's numbers and pictures on the synthetic world, end to end.

    python examples/testbed.py [--out testbed-out]

1. trains the tiny CLIP on the synthetic world (cached; ~2 minutes on 2 CPU cores),
2. writes a held-out Pascal-VOC-layout set and an image-caption CSV,
3. runs, through the `clipviz` command line: `train` (ECLIP, and the no-mask control),
   `eval` (every ViT method; ECLIP against stock ITSM), `explain` (comparison sheets) and
   `sanity` (the cascading randomisation test of the methods);
4. the same for the tiny SigLIP (a MAP head trained with the sigmoid loss, cached; ~2
   minutes): its methods and its ECLIP (trained with the sigmoid loss) beside the CLIP's.
Every command is printed before it runs; the tables land in OUT/tables.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from clipviz.testbed.tinyclip import ensure_tiny_clip
from clipviz.testbed.tinysiglip import ensure_tiny_siglip
from clipviz.testbed.world import CLASSES, class_prompt, write_captions_csv, write_voc

HELD_OUT_SEED, TRAIN_SEED = 1234, 99
METHODS = [
    "itsm",
    "attention",
    "surgery",
    "maskclip",
    "clearclip",
    "sclip",
    "naclip",
    "gem",
    "gradcam",
    "gradeclip",
    "gae",
    "legrad",
    "textspan",
    "rollout",
    "random",
]
SIGLIP_METHODS = ["itsm", "attention", "surgery", "maskclip", "clearclip", "sclip", "naclip", "gem",
                  "gradcam", "legrad", "random"]  # fmt: skip
SANITY_METHODS = ["itsm", "surgery", "clearclip", "sclip", "naclip", "gem", "gradcam",
                  "gradeclip", "gae", "legrad", "textspan", "rollout", "attention", "random"]  # fmt: skip


def clipviz(*args: str) -> None:
    cmd = ["clipviz", *args]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "clipviz", *args], check=True)


def table(path: Path, methods: list[str], labels: dict[str, str] | None = None) -> str:
    results = json.loads(path.read_text())["results"]
    rows = ["| method | mIoU % (τ) | mSC % | pointing | area |", "| --- | --- | --- | --- | --- |"]
    for m in methods:
        r = results[m]
        rows.append(
            f"| {(labels or {}).get(m, m)} | {r['miou']:.1f} ({r['miou_threshold']:.2f}) | "
            f"{r['msc']:+.1f} | {r['pointing']:.3f} | {r['area']:.3f} |"
        )
    return "\n".join(rows)


def sanity_table(path: Path) -> str:
    """Spearman ρ with the original maps after each layer is re-drawn, and the verdict."""
    data = json.loads(path.read_text())
    head = "| method | " + " | ".join(data["stages"]) + " | SSIM, all random | |"
    rows = [head, "| --- |" + " --- |" * (len(data["stages"]) + 2)]
    for name, s in data["methods"].items():
        cells = " | ".join("—" if v is None else f"{v:.2f}" for v in s["spearman"])
        verdict = "flagged" if s["flagged"] else "passes"
        last = "—" if s["ssim"][-1] is None else f"{s['ssim'][-1]:.2f}"  # null: undefined
        rows.append(f"| {name} | {cells} | {last} | {verdict} |")
    return "\n".join(rows)


def zero_shot(config: Path, weights: Path, n: int = 200) -> dict[str, float]:
    """Colour, shape and class accuracy on one-object held-out scenes (24-way over CLASSES)."""
    from PIL import Image

    import clipviz
    from clipviz.testbed.world import make_scenes

    model = clipviz.load_model(model_config=config, pretrained=str(weights))
    scenes = make_scenes(n, seed=HELD_OUT_SEED + 1, n_objects=1)
    exp = clipviz.explain(model, [Image.fromarray(s.image) for s in scenes],
                          [class_prompt(c) for c in CLASSES], ensemble=False)  # fmt: skip
    guess = [CLASSES[i].split() for i in exp.probs.argmax(dim=1).tolist()]
    truth = [(s.objects[0].colour, s.objects[0].shape) for s in scenes]
    return {
        "colour": sum(g[0] == t[0] for g, t in zip(guess, truth, strict=True)) / n,
        "shape": sum(g[1] == t[1] for g, t in zip(guess, truth, strict=True)) / n,
        "class": sum(tuple(g) == t for g, t in zip(guess, truth, strict=True)) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("testbed-out"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "clipviz-testbed")
    args = parser.parse_args()
    out, cache = args.out, args.cache
    tiny = ensure_tiny_clip(
        cache, progress=lambda s, n, loss: s % 100 or print(f"tiny CLIP step {s}/{n}")
    )
    model = ["--model-config", str(tiny.config_path), "--pretrained", str(tiny.weights_path)]
    scenes = write_voc(out / "heldout", 200, seed=HELD_OUT_SEED)
    write_captions_csv(out / "world", 1500, seed=TRAIN_SEED)
    classes = out / "prompts.txt"
    classes.write_text("".join(f"{c}: {class_prompt(c)}\n" for c in CLASSES))
    common = ["--classes-file", str(classes), "--no-ensemble", "--pointing-tolerance", "0",
              "--metric", "miou", "--metric", "msc", "--metric", "pointing", "--fresh", "-q"]  # fmt: skip

    for name, mask in (("eclip", ["--mask-rule", "mean"]), ("nomask", ["--mask-rule", "topk", "--mask-value", "1"])):  # fmt: skip
        clipviz("train", str(out / "world" / "captions.csv"), "--out", str(out / name), "--steps",
                "300", "--lr", "3e-3", "-b", "64", *mask, "-q", *model)  # fmt: skip
    methods = [a for m in METHODS for a in ("-m", m)]
    clipviz(
        "eval", str(out / "heldout"), *methods, "--json", str(out / "methods.json"), *common, *model
    )
    for name in ("eclip", "nomask"):
        clipviz("eval", str(out / "heldout"), "-m", "eclip", "--eclip",
                str(out / name / "eclip.safetensors"), "--json", str(out / f"{name}.json"),
                *common, *model)  # fmt: skip
    sheet = ["-m", "itsm", "-m", "eclip", "--eclip", str(out / "eclip" / "eclip.safetensors"),
             "-m", "surgery", "-m", "gradcam", "-m", "legrad"]  # fmt: skip
    for i in (0, 3):  # each scene's objects as prompts, plus one class that is absent
        present = [o.name for o in scenes[i].objects]
        absent = next(c for c in CLASSES if c not in present)
        prompts = [class_prompt(c) for c in [*present, absent]]
        image = out / "heldout" / "JPEGImages" / f"synth_{i:05d}.png"
        clipviz("explain", str(image), *prompts, *sheet, "--no-ensemble", "-o",
                str(out / "sheets"), "-q", *model)  # fmt: skip

    sanity = [a for m in SANITY_METHODS for a in ("-m", m)]
    clipviz("sanity", str(out / "heldout"), "-f", "voc", "--classes-file", str(classes),
            "--no-ensemble", "--limit", "50", *sanity, "-o", str(out / "sanity"), "-q", *model)  # fmt: skip

    siglip = ensure_tiny_siglip(
        cache, progress=lambda s, n, loss: s % 100 or print(f"tiny SigLIP step {s}/{n}")
    )
    siglip_model = ["--model-config", str(siglip.config_path), "--pretrained",
                    str(siglip.weights_path)]  # fmt: skip
    clipviz("train", str(out / "world" / "captions.csv"), "--out", str(out / "siglip-eclip"),
            "--steps", "300", "--lr", "3e-3", "-b", "64", "--mask-rule", "mean", "-q",
            *siglip_model)  # fmt: skip
    siglip_methods = [a for m in SIGLIP_METHODS for a in ("-m", m)]
    clipviz("eval", str(out / "heldout"), *siglip_methods, "-m", "eclip", "--eclip",
            str(out / "siglip-eclip" / "eclip.safetensors"), "--json",
            str(out / "siglip-methods.json"), *common, *siglip_model)  # fmt: skip

    eclip = json.loads((out / "eclip.json").read_text())["results"]["eclip"]
    nomask = json.loads((out / "nomask.json").read_text())["results"]["eclip"]
    stock = json.loads((out / "methods.json").read_text())["results"]["itsm"]
    rows = ["| map | mIoU % (τ) | mSC % | pointing | area |", "| --- | --- | --- | --- | --- |"]
    for label, r in (("stock ITSM", stock), ("ECLIP (mask: free attention ≥ mean)", eclip),
                     ("max pooling without mask (control)", nomask)):  # fmt: skip
        rows.append(f"| {label} | {r['miou']:.1f} ({r['miou_threshold']:.2f}) | {r['msc']:+.1f} | "
                    f"{r['pointing']:.3f} | {r['area']:.3f} |")  # fmt: skip
    acc = zero_shot(tiny.config_path, tiny.weights_path)
    siglip_acc = zero_shot(siglip.config_path, siglip.weights_path)
    clip_results = json.loads((out / "methods.json").read_text())["results"]
    clip_results["eclip"] = eclip
    siglip_results = json.loads((out / "siglip-methods.json").read_text())["results"]
    pair = ["| method | CLIP mIoU % | CLIP mSC % | CLIP pointing | SigLIP mIoU % | SigLIP mSC % "
            "| SigLIP pointing |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for m in [*SIGLIP_METHODS[:-1], "eclip", "random"]:
        cells = []
        for res in (clip_results, siglip_results):
            r = res[m]
            cells += [f"{r['miou']:.1f}", f"{r['msc']:+.1f}", f"{r['pointing']:.3f}"]
        pair.append(f"| {m} | " + " | ".join(cells) + " |")
    text = (
        f"zero-shot on 200 one-object scenes: colour {acc['colour']:.2f} (chance 0.17), "
        f"shape {acc['shape']:.2f} (0.25), class {acc['class']:.2f} (0.04)\n\n"
        "## Methods\n\n"
        + table(out / "methods.json", METHODS)
        + "\n\n## ECLIP\n\n"
        + "\n".join(rows)
        + "\n\n## CLIP and SigLIP (MAP head, sigmoid loss) on the same scenes\n\n"
        + f"SigLIP zero-shot: colour {siglip_acc['colour']:.2f}, shape {siglip_acc['shape']:.2f}, "
        + f"class {siglip_acc['class']:.2f}\n\n"
        + "\n".join(pair)
        + "\n\n## Sanity (cascading randomisation, 50 scenes)\n\n"
        + sanity_table(out / "sanity" / "sanity.json")
        + "\n"
    )
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
