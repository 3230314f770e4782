"""Reproduce the documentation's test-bed numbers, on one synthetic world or on several.

    python examples/testbed.py [--out testbed-out]            # the test bed (world 0)
    python examples/testbed.py --seeds 5 [--jobs 2]          # worlds 0-4: the documented ranges

For each seed s (world 0 is the test bed; every other seed draws its own six colours, four
shapes and backgrounds, `clipviz.testbed.world.World.from_seed`), under OUT/seed-<s>/:

1. trains (cached) a tiny CLIP and a tiny SigLIP on that world, the same way for every seed;
2. writes a held-out Pascal-VOC-layout set and an image-caption CSV of that world;
3. runs, through the `clipviz` command line: `train` (ECLIP with the free-attention mask, and
   the no-mask control, at each of `--eclip-steps`), `eval` (every ViT method; ECLIP against
   stock ITSM), `eval --task segment` (the segmentation protocol, with and without PAMR),
   `sanity` (the cascading randomisation test), and the SigLIP's methods and ECLIP;
4. writes `seed.json` with every number (a seed whose `seed.json` exists is read back, not
   recomputed, unless `--fresh`).

Then OUT/tables.md and OUT/summary.json hold the per-seed tables, and over the seeds the mean,
min-max and a 95 % interval (Student's t over seeds) of every number, and how many seeds each
of the documentation's claims holds on. Every command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

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
SIGLIP_METHODS = [
    "itsm",
    "attention",
    "surgery",
    "maskclip",
    "clearclip",
    "sclip",
    "naclip",
    "gem",
    "gradcam",
    "legrad",
    "random",
]
SANITY_METHODS = [
    "itsm",
    "surgery",
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
    "attention",
    "random",
]
SEGMENT_METHODS = [
    "itsm",
    "maskclip",
    "clearclip",
    "sclip",
    "naclip",
    "resclip",
    "gem",
    "surgery",
    "random",
]
MASKS = {"mean": ["--mask-rule", "mean"], "nomask": ["--mask-rule", "topk", "--mask-value", "1"]}
METRICS = ("miou", "msc", "pointing", "area")
# Student's t at 97.5 % for 1..10 degrees of freedom (a 95 % interval of a mean over seeds).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def clipviz(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = ["clipviz", *args]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "clipviz", *args], check=True, env=env)


def zero_shot(config: Path, weights: Path, world: Any, n: int = 200) -> dict[str, float]:
    """Colour, shape and class accuracy on one-object held-out scenes (24-way over the
    world's classes)."""
    from PIL import Image

    import clipviz
    from clipviz.testbed.world import class_prompt, make_scenes

    model = clipviz.load_model(model_config=config, pretrained=str(weights))
    scenes = make_scenes(n, seed=HELD_OUT_SEED + 1, n_objects=1, world=world)
    exp = clipviz.explain(
        model,
        [Image.fromarray(s.image) for s in scenes],
        [class_prompt(c) for c in world.classes],
        ensemble=False,
    )
    guess = [world.classes[i].split() for i in exp.probs.argmax(dim=1).tolist()]
    truth = [(s.objects[0].colour, s.objects[0].shape) for s in scenes]
    return {
        "colour": sum(g[0] == t[0] for g, t in zip(guess, truth, strict=True)) / n,
        "shape": sum(g[1] == t[1] for g, t in zip(guess, truth, strict=True)) / n,
        "class": sum(tuple(g) == t for g, t in zip(guess, truth, strict=True)) / n,
    }


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    keep = (*METRICS, "miou_threshold")
    return {m: {k: r[k] for k in keep if k in r} for m, r in results.items()}


def run_seed(
    seed: int, out: Path, cache: Path, eclip_steps: Sequence[int], threads: int, siglip: bool
) -> dict:
    """Every number of one world (the SigLIP's last, when `siglip`); also written to
    `out/seed.json`."""
    from clipviz.testbed.tinyclip import ensure_tiny_clip
    from clipviz.testbed.tinysiglip import ensure_tiny_siglip
    from clipviz.testbed.world import World, class_prompt, write_captions_csv, write_voc

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    world = World.from_seed(seed)
    print(f"# {world.describe()}", flush=True)
    tiny = ensure_tiny_clip(cache, seed=seed)
    model = ["--model-config", str(tiny.config_path), "--pretrained", str(tiny.weights_path)]
    heldout = out / "heldout"
    scenes = write_voc(heldout, 200, seed=HELD_OUT_SEED, world=world)
    write_captions_csv(out / "world", 1500, seed=TRAIN_SEED, world=world)
    classes = out / "prompts.txt"
    classes.write_text("".join(f"{c}: {class_prompt(c)}\n" for c in world.classes))
    common = [
        "--classes-file",
        str(classes),
        "--no-ensemble",
        "--pointing-tolerance",
        "0",
        "--metric",
        "miou",
        "--metric",
        "msc",
        "--metric",
        "pointing",
        "--fresh",
        "-q",
    ]
    run = lambda *a: clipviz(*a, env=env)  # noqa: E731

    def once(path: Path, make: Callable[[], None]) -> dict:
        if not path.is_file():
            make()
        return json.loads(path.read_text())

    methods = once(
        out / "methods.json",
        lambda: run(
            "eval",
            str(heldout),
            *[a for m in METHODS for a in ("-m", m)],
            "--json",
            str(out / "methods.json"),
            *common,
            *model,
        ),
    )
    eclip: dict[str, dict[str, Any]] = {}
    for steps in eclip_steps:
        for rule, mask in MASKS.items():
            name = f"{rule}-{steps}"

            def train_and_score(
                name: str = name, mask: list[str] = mask, steps: int = steps
            ) -> None:
                run(
                    "train",
                    str(out / "world" / "captions.csv"),
                    "--out",
                    str(out / name),
                    "--steps",
                    str(steps),
                    "--lr",
                    "3e-3",
                    "-b",
                    "64",
                    *mask,
                    "-q",
                    *model,
                )
                run(
                    "eval",
                    str(heldout),
                    "-m",
                    "eclip",
                    "--eclip",
                    str(out / name / "eclip.safetensors"),
                    "--json",
                    str(out / f"{name}.json"),
                    *common,
                    *model,
                )
                shutil.rmtree(out / name / "checkpoints", ignore_errors=True)

            eclip.setdefault(rule, {})[str(steps)] = _metrics(
                once(out / f"{name}.json", train_and_score)["results"]
            )["eclip"]
    segment = once(
        out / "segment.json",
        lambda: run(
            "eval",
            str(heldout),
            "--task",
            "segment",
            *[a for m in SEGMENT_METHODS for a in ("-m", m)],
            "--pamr-compare",
            "--short-side",
            "0",
            "--window",
            "0",
            "--prob-thd",
            "0.1",
            "--json",
            str(out / "segment.json"),
            "-q",
            *model,
        ),
    )
    sanity = once(
        out / "sanity" / "sanity.json",
        lambda: run(
            "sanity",
            str(heldout),
            "-f",
            "voc",
            "--classes-file",
            str(classes),
            "--no-ensemble",
            "--limit",
            "50",
            *[a for m in SANITY_METHODS for a in ("-m", m)],
            "-o",
            str(out / "sanity"),
            "-q",
            *model,
        ),
    )
    if seed == 0:  # the documentation's comparison sheets
        sheet = [
            "-m",
            "itsm",
            "-m",
            "eclip",
            "--eclip",
            str(out / f"mean-{eclip_steps[0]}" / "eclip.safetensors"),
            "-m",
            "surgery",
            "-m",
            "gradcam",
            "-m",
            "legrad",
        ]
        for i in (0, 3):  # each scene's objects as prompts, plus one class that is absent
            present = [o.name for o in scenes[i].objects]
            absent = next(c for c in world.classes if c not in present)
            prompts = [class_prompt(c) for c in [*present, absent]]
            image = heldout / "JPEGImages" / f"synth_{i:05d}.png"
            run(
                "explain",
                str(image),
                *prompts,
                *sheet,
                "--no-ensemble",
                "-o",
                str(out / "sheets"),
                "-q",
                *model,
            )
    record: dict[str, Any] = {
        "seed": seed,
        "world": {"colours": list(world.colours), "shapes": list(world.shapes)},
        "zero_shot": {"clip": zero_shot(tiny.config_path, tiny.weights_path, world)},
        "methods": _metrics(methods["results"]),
        "eclip": eclip,
        "segment": {
            row: {k: r[k] for k in ("miou", "aacc")} for row, r in segment["results"].items()
        },
        "sanity": {
            m: {"spearman": s["spearman"], "ssim": s["ssim"][-1], "flagged": s["flagged"]}
            for m, s in sanity["methods"].items()
        },
        "sanity_stages": sanity["stages"],
    }
    if siglip:
        tiny_siglip = ensure_tiny_siglip(cache, seed=seed)
        siglip_model = [
            "--model-config",
            str(tiny_siglip.config_path),
            "--pretrained",
            str(tiny_siglip.weights_path),
        ]
        siglip_methods = once(
            out / "siglip-methods.json",
            lambda: (
                run(
                    "train",
                    str(out / "world" / "captions.csv"),
                    "--out",
                    str(out / "siglip-eclip"),
                    "--steps",
                    str(eclip_steps[0]),
                    "--lr",
                    "3e-3",
                    "-b",
                    "64",
                    "--mask-rule",
                    "mean",
                    "-q",
                    *siglip_model,
                ),
                run(
                    "eval",
                    str(heldout),
                    *[a for m in SIGLIP_METHODS for a in ("-m", m)],
                    "-m",
                    "eclip",
                    "--eclip",
                    str(out / "siglip-eclip" / "eclip.safetensors"),
                    "--json",
                    str(out / "siglip-methods.json"),
                    *common,
                    *siglip_model,
                ),
            )[-1],
        )
        record["zero_shot"]["siglip"] = zero_shot(
            tiny_siglip.config_path, tiny_siglip.weights_path, world
        )
        record["siglip_methods"] = _metrics(siglip_methods["results"])
    (out / "seed.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ---- over seeds -------------------------------------------------------------------------


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, min, max and a 95 % interval of the mean (Student's t) over the seeds' values."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return {"n": 0, "mean": None, "min": None, "max": None, "ci": None}
    mean = sum(xs) / len(xs)
    if len(xs) > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        half = T975[min(len(xs) - 2, len(T975) - 1)] * sd / math.sqrt(len(xs))
        ci = [mean - half, mean + half]
    else:
        ci = None
    return {"n": len(xs), "mean": mean, "min": min(xs), "max": max(xs), "ci": ci}


def summarise(tree: Sequence[Any]) -> Any:
    """The seeds' records merged leaf by leaf: numbers become their `spread`, lists and
    dicts are walked, anything else is kept when every seed agrees."""
    first = tree[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(t, dict) and k in t for t in tree)]
        return {k: summarise([t[k] for t in tree]) for k in keys}
    if isinstance(first, list) and all(isinstance(t, list) and len(t) == len(first) for t in tree):
        return [summarise([t[i] for t in tree]) for i in range(len(first))]
    if isinstance(first, bool):
        return {"true": sum(bool(t) for t in tree), "of": len(tree)}
    if isinstance(first, (int, float)) or first is None:
        return spread(tree)
    return first if all(t == first for t in tree) else None


def claims(records: Sequence[dict]) -> list[dict[str, Any]]:
    """The documentation's claims about the test bed, each checked on every seed."""
    steps = sorted(records[0]["eclip"]["mean"], key=int)
    first = steps[0]

    def msc(r: dict, m: str) -> float:
        return r["methods"][m]["msc"]

    def each(text: str, test: Callable[[dict], bool], needs: str = "methods") -> dict[str, Any]:
        """On how many of the seeds that have `needs` the claim holds."""
        have = [r for r in records if needs in r]
        held = [r["seed"] for r in have if test(r)]
        return {"claim": text, "holds": len(held), "of": len(have), "seeds": held}

    text_methods = [
        "surgery",
        "clearclip",
        "sclip",
        "naclip",
        "gem",
        "gradeclip",
        "gae",
        "legrad",
        "textspan",
    ]
    out = [
        each(
            "the tiny CLIP names the colour of one-object scenes at least 9 times in 10",
            lambda r: r["zero_shot"]["clip"]["colour"] >= 0.9,
        ),
        each(
            "the tiny CLIP names the shape above chance (1/4)",
            lambda r: r["zero_shot"]["clip"]["shape"] > 0.25,
        ),
        each("stock ITSM prefers the background (mSC < 0)", lambda r: msc(r, "itsm") < 0),
        each(
            "CLIP Surgery's mSC is the highest of the text-conditioned methods",
            lambda r: msc(r, "surgery") >= max(msc(r, m) for m in text_methods),
        ),
        each(
            "every text-conditioned method scores a higher mSC than stock ITSM",
            lambda r: all(msc(r, m) > msc(r, "itsm") for m in text_methods),
        ),
        each(
            "TextSpan points at the object more often than any other method",
            lambda r: (
                r["methods"]["textspan"]["pointing"]
                >= max(v["pointing"] for v in r["methods"].values())
            ),
        ),
        each(
            "SCLIP, NACLIP and GEM score above stock ITSM and below CLIP Surgery (mSC)",
            lambda r: all(
                msc(r, "itsm") < msc(r, m) < msc(r, "surgery") for m in ("sclip", "naclip", "gem")
            ),
        ),
    ]
    for s in steps:
        out.append(
            each(
                f"ECLIP ({s} steps) lifts mSC above stock ITSM's",
                lambda r, s=s: r["eclip"]["mean"][s]["msc"] > msc(r, "itsm"),
            )
        )
        out.append(
            each(
                f"ECLIP ({s} steps) lifts mSC above stock ITSM's by more than 10 points",
                lambda r, s=s: r["eclip"]["mean"][s]["msc"] > msc(r, "itsm") + 10,
            )
        )
        out.append(
            each(
                f"the free-attention mask beats max pooling without it ({s} steps, mSC)",
                lambda r, s=s: r["eclip"]["mean"][s]["msc"] > r["eclip"]["nomask"][s]["msc"],
            )
        )
    out.append(
        each(
            f"ECLIP's maps ({first} steps) prefer the objects (mSC > 0)",
            lambda r: r["eclip"]["mean"][first]["msc"] > 0,
        )
    )
    out += [
        each(
            f"when stock ITSM prefers the background, ECLIP ({first} steps) lifts mSC",
            lambda r: msc(r, "itsm") >= 0 or r["eclip"]["mean"][first]["msc"] > msc(r, "itsm"),
        ),
        each(
            "the SigLIP's plain ITSM follows the objects (mSC > 0)",
            lambda r: r["siglip_methods"]["itsm"]["msc"] > 0,
            "siglip_methods",
        ),
        each(
            "on the SigLIP, ECLIP does not beat plain ITSM by more than 5 points (mSC)",
            lambda r: r["siglip_methods"]["eclip"]["msc"] < r["siglip_methods"]["itsm"]["msc"] + 5,
            "siglip_methods",
        ),
        each(
            "the SigLIP's ITSM scores a higher mSC than the CLIP's",
            lambda r: r["siglip_methods"]["itsm"]["msc"] > msc(r, "itsm"),
            "siglip_methods",
        ),
        each(
            "NACLIP, CLIP Surgery and ClearCLIP segment above random maps (mIoU, no PAMR)",
            lambda r: all(
                r["segment"][m]["miou"] > r["segment"]["random"]["miou"]
                for m in ("naclip", "surgery", "clearclip")
            ),
        ),
        each(
            "PAMR raises NACLIP's segmentation mIoU",
            lambda r: r["segment"]["naclip+pamr"]["miou"] > r["segment"]["naclip"]["miou"],
        ),
        each(
            "every text-conditioned method loses its maps once the head is random "
            "(Spearman < 0.3 after the first stage)",
            lambda r: all(
                r["sanity"][m]["spearman"][0] < 0.3
                for m in ("itsm", "surgery", "gem", "gradcam", "gradeclip", "legrad", "textspan")
            ),
        ),
        each(
            "only the random baseline is flagged by the sanity check",
            lambda r: [m for m, s in r["sanity"].items() if s["flagged"]] == ["random"],
        ),
        each(
            "rollout keeps its maps until the first block is re-drawn (ρ > 0.5 before)",
            lambda r: min(r["sanity"]["rollout"]["spearman"][:-1]) > 0.5,
        ),
    ]
    return out


def fmt(s: dict[str, Any], digits: int = 1, sign: bool = False) -> str:
    """ "mean [min, max]" of a spread (minus signs as "−")."""
    if not s or s.get("mean") is None:
        return "—"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    cell = f.format(s["mean"])
    if s["n"] > 1:
        cell += f" [{f.format(s['min'])}, {f.format(s['max'])}]"
    return cell.replace("-", "−")


def tables(records: Sequence[dict], summary: dict[str, Any], found: list[dict]) -> str:
    n = len(records)
    seeds = ", ".join(str(r["seed"]) for r in records)
    lines = [f"# Test bed: {n} world{'s' * (n > 1)} ({seeds})", ""]
    for r in records:
        lines.append(
            f"- world {r['seed']}: colours {', '.join(r['world']['colours'])}; "
            f"shapes {', '.join(r['world']['shapes'])}"
        )
    zs = summary["zero_shot"]
    lines += [
        "",
        "## Zero-shot (200 one-object scenes)",
        "",
        "| model | colour | shape | class |",
        "| --- | --- | --- | --- |",
    ]
    for model in [m for m in ("clip", "siglip") if m in zs]:
        lines.append(
            f"| {model} | "
            + " | ".join(fmt(zs[model][k], 2) for k in ("colour", "shape", "class"))
            + " |"
        )
    base = records[0]  # world 0 when it is among the seeds: the documentation's own columns
    w, nw = f"world {base['seed']}", f"{n} worlds"

    def at(r: dict[str, Any], digits: int = 1, sign: bool = False, tau: bool = False) -> str:
        f = f"{{:{'+' if sign else ''}.{digits}f}}"
        value = round(r["miou"] if tau else r, digits) + 0.0  # no "-0.00"
        cell = f.format(value) + (f" ({r['miou_threshold']:.2f})" if tau else "")
        return cell.replace("-", "−")

    lines += [
        "",
        f"## Methods (tiny CLIP): {w}, and mean [min, max] over {nw}",
        "",
        f"| method | mIoU % (τ), {w} | mSC %, {w} | pointing, {w} | area | mSC %, {nw} "
        f"| pointing, {nw} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS:
        r, s = base["methods"][m], summary["methods"][m]
        lines.append(
            f"| {m} | {at(r, tau=True)} | {at(r['msc'], sign=True)} | {at(r['pointing'], 3)} | "
            f"{at(r['area'], 3)} | {fmt(s['msc'], sign=True)} | {fmt(s['pointing'], 3)} |"
        )
    lines += [
        "",
        "## ECLIP against stock ITSM and the no-mask control",
        "",
        f"| map | steps | mIoU % (τ), {w} | mSC %, {w} | pointing, {w} | mSC %, {nw} "
        f"| pointing, {nw} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    r, s = base["methods"]["itsm"], summary["methods"]["itsm"]
    lines.append(
        f"| stock ITSM | — | {at(r, tau=True)} | {at(r['msc'], sign=True)} | "
        f"{at(r['pointing'], 3)} | {fmt(s['msc'], sign=True)} | {fmt(s['pointing'], 3)} |"
    )
    labels = {"mean": "ECLIP (mask: free attention ≥ its mean)", "nomask": "max pooling, no mask"}
    for steps in sorted(summary["eclip"]["mean"], key=int):
        for rule in MASKS:
            r, s = base["eclip"][rule][steps], summary["eclip"][rule][steps]
            lines.append(
                f"| {labels[rule]} | {steps} | {at(r, tau=True)} | {at(r['msc'], sign=True)} | "
                f"{at(r['pointing'], 3)} | {fmt(s['msc'], sign=True)} | {fmt(s['pointing'], 3)} |"
            )
    if "siglip_methods" in base:
        with_siglip = [r for r in records if "siglip_methods" in r]
        over = summarise([r["siglip_methods"] for r in with_siglip])
        k = f"{len(with_siglip)} worlds"
        lines += [
            "",
            f"## CLIP and SigLIP, {w}; the SigLIP's mSC over {k}",
            "",
            f"| method | CLIP mIoU % | CLIP mSC % | CLIP pointing | SigLIP mIoU % | SigLIP mSC % "
            f"| SigLIP pointing | SigLIP mSC %, {k} |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m in [*SIGLIP_METHODS[:-1], "eclip", "random"]:
            first = sorted(base["eclip"]["mean"], key=int)[0]
            c = base["methods"][m] if m in base["methods"] else base["eclip"]["mean"][first]
            g = base["siglip_methods"][m]
            lines.append(
                f"| {m} | {at(c['miou'])} | {at(c['msc'], sign=True)} | {at(c['pointing'], 3)} | "
                f"{at(g['miou'])} | {at(g['msc'], sign=True)} | {at(g['pointing'], 3)} | "
                f"{fmt(over[m]['msc'], sign=True)} |"
            )
    lines += [
        "",
        "## Segmentation (protocol, one window, prob-thd 0.1)",
        "",
        f"| method | mIoU %, {w} | with PAMR, {w} | aAcc %, {w} | mIoU %, {nw} | with PAMR, {nw} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in SEGMENT_METHODS:
        r, seg = base["segment"], summary["segment"]
        lines.append(
            f"| {m} | {at(r[m]['miou'])} | {at(r[m + '+pamr']['miou'])} | {at(r[m]['aacc'])} | "
            f"{fmt(seg[m]['miou'])} | {fmt(seg[m + '+pamr']['miou'])} |"
        )
    stages = base["sanity_stages"]
    lines += [
        "",
        f"## Sanity (Spearman ρ after each stage, 50 scenes), {w}; then over {nw}",
        "",
        "| method | " + " | ".join(stages) + f" | SSIM, all random | ρ, all random, {nw} "
        "| flagged on |",
        "| --- |" + " --- |" * (len(stages) + 3),
    ]
    for m, s in summary["sanity"].items():
        r = base["sanity"][m]
        cells = " | ".join("—" if v is None else at(v, 2) for v in r["spearman"])
        ssim = "—" if r["ssim"] is None else at(r["ssim"], 2)
        lines.append(
            f"| {m} | {cells} | {ssim} | {fmt(s['spearman'][-1], 2)} | "
            f"{s['flagged']['true']} of {s['flagged']['of']} |"
        )
    lines += per_seed_tables(records)
    lines += ["", "## Claims", "", "| claim | holds on | seeds |", "| --- | --- | --- |"]
    for c in found:
        lines.append(
            f"| {c['claim']} | {c['holds']} of {c['of']} | "
            f"{', '.join(map(str, c['seeds'])) or '—'} |"
        )
    return "\n".join(lines) + "\n"


Row = tuple[str, Callable[[dict], float | None]]


def per_seed(title: str, rows: Sequence[Row], records: Sequence[dict], digits: int = 1) -> list:
    """A table of one number per seed and row, then its mean [min, max] and 95 % interval."""
    seeds = [r["seed"] for r in records]
    out = [
        "",
        f"### {title}",
        "",
        "| | " + " | ".join(f"world {s}" for s in seeds) + " | mean [min, max] | 95 % interval |",
        "| --- |" + " --- |" * (len(seeds) + 2),
    ]
    for label, get in rows:
        values = []
        for r in records:
            try:
                values.append(get(r))
            except KeyError:
                values.append(None)
        s = spread(values)
        ci = "—" if not s.get("ci") else f"{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}"
        cells = ["—" if v is None else f"{v:.{digits}f}".replace("-", "−") for v in values]
        out.append(
            f"| {label} | " + " | ".join(cells) + f" | {fmt(s, digits)} | {ci.replace('-', '−')} |"
        )
    return out


def per_seed_tables(records: Sequence[dict]) -> list[str]:
    """Every seed's numbers, table by table."""
    steps = sorted(records[0]["eclip"]["mean"], key=int)
    lines = ["", "## Per seed"]
    lines += per_seed(
        "Zero-shot accuracy, tiny CLIP (colour, shape)",
        [(k, lambda r, k=k: r["zero_shot"]["clip"][k]) for k in ("colour", "shape")],
        records,
        2,
    )
    for metric, digits in (("msc", 1), ("pointing", 3), ("miou", 1)):
        lines += per_seed(
            f"{metric} of every method (tiny CLIP)",
            [(m, lambda r, m=m, k=metric: r["methods"][m][k]) for m in METHODS],
            records,
            digits,
        )
    eclip: list[Row] = [("stock ITSM", lambda r: r["methods"]["itsm"]["msc"])]
    for st in steps:
        eclip += [
            (f"{rule} mask, {st} steps", lambda r, rule=rule, st=st: r["eclip"][rule][st]["msc"])
            for rule in MASKS
        ]
    lines += per_seed(
        "mSC of ECLIP (mask: mean = free attention ≥ its mean, nomask = max "
        "pooling over every token)",
        eclip,
        records,
    )
    lines += per_seed(
        "Segmentation mIoU (protocol; +pamr: with PAMR)",
        [
            (row, lambda r, row=row: r["segment"][row]["miou"])
            for m in SEGMENT_METHODS
            for row in (m, f"{m}+pamr")
        ],
        records,
    )
    lines += per_seed(
        "Sanity: Spearman ρ once the whole tower is random",
        [(m, lambda r, m=m: r["sanity"][m]["spearman"][-1]) for m in SANITY_METHODS],
        records,
        2,
    )
    if any("siglip_methods" in r for r in records):
        lines += per_seed(
            "mSC of the tiny SigLIP's methods",
            [(m, lambda r, m=m: r["siglip_methods"][m]["msc"]) for m in [*SIGLIP_METHODS, "eclip"]],
            records,
        )
    return lines


def train_models(seeds: Sequence[int], cache: Path, siglip: bool) -> None:
    """Each seed's tiny CLIP and SigLIP, trained (or found) in the cache."""
    from clipviz.testbed.tinyclip import ensure_tiny_clip
    from clipviz.testbed.tinysiglip import ensure_tiny_siglip

    def say(model: str, seed: int, every: int) -> Callable[[int, int, float], None]:
        return lambda s, n, _: None if s % every else print(f"seed {seed}: tiny {model} {s}/{n}")

    for seed in seeds:
        ensure_tiny_clip(cache, seed=seed, progress=say("CLIP", seed, 100))
        if siglip:
            ensure_tiny_siglip(cache, seed=seed, progress=say("SigLIP", seed, 200))


def seed_record(
    seed: int, root: Path, cache: Path, steps: Sequence[int], threads: int, siglip: bool
) -> dict:
    """One seed's record: read back from `root/seed-<seed>/seed.json` when it holds every
    ECLIP length of `steps` (and the SigLIP's numbers, when `siglip`), else computed (what
    is already on disk is reused)."""
    import torch

    torch.set_num_threads(threads)
    out = root / f"seed-{seed}"
    done = out / "seed.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if all(str(s) in record["eclip"]["mean"] for s in steps) and (
            not siglip or "siglip_methods" in record
        ):
            return record
    out.mkdir(parents=True, exist_ok=True)
    return run_seed(seed, out, cache, steps, threads, siglip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("testbed-out"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "clipviz-testbed")
    parser.add_argument("--seeds", type=int, default=1, help="worlds 0..N-1 (default 1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--eclip-steps",
        default="300,1000,3000",
        help="ECLIP training lengths, comma-separated (default 300,1000,3000)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds run at once (each with cores/jobs threads)"
    )
    parser.add_argument(
        "--no-siglip",
        dest="siglip",
        action="store_false",
        help="leave the tiny SigLIP out (its training is the longest step)",
    )
    parser.add_argument("--fresh", action="store_true", help="recompute seeds already done")
    args = parser.parse_args()
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    try:
        steps = [int(s) for s in args.eclip_steps.split(",")]
    except ValueError:
        parser.error(f"--eclip-steps: comma-separated step counts, got {args.eclip_steps!r}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.fresh:
        for seed in seeds:
            shutil.rmtree(args.out / f"seed-{seed}", ignore_errors=True)
    # The test bed's models with every core, as the tests train them (the others train in the
    # seeds' processes).
    train_models([s for s in seeds if s == 0], args.cache, args.siglip)
    # The longest ECLIP runs last: every other number of every seed comes first.
    for todo in ([steps[:-1]] if len(steps) > 1 else []) + [steps]:
        with ProcessPoolExecutor(args.jobs) as pool:
            records = list(
                pool.map(
                    seed_record,
                    seeds,
                    [args.out] * len(seeds),
                    [args.cache] * len(seeds),
                    [todo] * len(seeds),
                    [threads] * len(seeds),
                    [args.siglip] * len(seeds),
                )
            )
    for r in records:  # only the requested training lengths
        for rule in r["eclip"]:
            r["eclip"][rule] = {s: v for s, v in r["eclip"][rule].items() if int(s) in steps}
    summary = summarise(records)
    found = claims(records)
    (args.out / "summary.json").write_text(
        json.dumps(
            {"seeds": list(seeds), "summary": summary, "claims": found, "records": records},
            indent=1,
        )
        + "\n"
    )
    text = tables(records, summary, found)
    (args.out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
