# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Methods × prompts: the same image, many explanations
#
# clipviz implements the saliency methods of the CLIP literature behind one call,
# `clipviz.explain(model, images, prompts, method, options=...)`. They disagree, often a
# lot. This notebook lays several methods side by side on one scene and several prompts,
# then measures on a dozen scenes which methods put their map on the object named.
#
# It runs on the test bed (a tiny CLIP trained on coloured shapes, cached after the first
# run); with network, `model = clipviz.load_model()` loads ViT-B-16 with OpenAI's weights
# and everything below works the same on your photos.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from PIL import Image

import clipviz
from clipviz.testbed import world
from clipviz.testbed.tinyclip import ensure_tiny_clip

cache = Path(os.environ.get("CLIPVIZ_TESTBED_CACHE") or Path.home() / ".cache/clipviz-testbed")
tiny = ensure_tiny_clip(cache)
model = clipviz.load_model(
    model_config=tiny.config_path, pretrained=str(tiny.weights_path), device="cpu"
)

# %% [markdown]
# ## The methods and their options
#
# `clipviz.METHODS` is the registry. Each method's options come from its signature, with
# types, defaults and help; `explain` checks them and refuses an unknown or ill-typed one
# with a message listing what the method takes.

# %%
for name in ("itsm", "surgery", "gradcam", "legrad", "textspan"):
    print(f"{name:9s}", [opt.name for opt in clipviz.METHODS[name].options])
try:
    clipviz.explain(
        model, [Image.new("RGB", (64, 64))], ["a red circle"], "gradcam", options={"layr": 2}
    )
except clipviz.ClipvizError as e:
    print("refused:", e)

# %% [markdown]
# ## One scene, several prompts, several methods
#
# A scene with two objects, and three prompts: each object, and one that is absent. Rows
# are prompts, columns methods; each method's map is min-max normalised on its own (red is
# that map's highest value), so compare *where*, not *how much*.

# %%
scene = world.make_scenes(1, seed=21, n_objects=2)[0]
image = Image.fromarray(scene.image)
absent = next(c for c in world.CLASSES if c not in {o.name for o in scene.objects})
PROMPTS = [world.class_prompt(o.name) for o in scene.objects] + [world.class_prompt(absent)]
METHODS = ["itsm", "surgery", "gradcam", "legrad", "textspan"]

explained = {m: clipviz.explain(model, [image], PROMPTS, m) for m in METHODS}

fig, axes = plt.subplots(len(PROMPTS), len(METHODS) + 1, figsize=(2 * (len(METHODS) + 1), 6.2))
for row, prompt in enumerate(PROMPTS):
    axes[row, 0].imshow(image)
    p = float(explained["itsm"].probs[0, row])
    axes[row, 0].set_title(f"{prompt}\np = {p:.2f}", fontsize=8)
    for col, method in enumerate(METHODS, start=1):
        axes[row, col].imshow(explained[method].overlay(0, prompt))
        if row == 0:
            axes[row, col].set_title(method, fontsize=9)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# The probabilities are the model's (softmax over the prompts) and do not depend on the
# method. Options change a method's map: Grad-CAM at an earlier block, CLIP Surgery with
# fewer surgery blocks.

# %%
display(clipviz.explain(model, [image], PROMPTS[:1], "gradcam", options={"layer": -2}))
display(clipviz.explain(model, [image], PROMPTS[:1], "surgery", options={"depth": 2}))

# %% [markdown]
# ## Which methods point at the object?
#
# On 12 one-object scenes, we explain the object's own prompt with every method and take
# the *score contrast*: the normalised map's mean on the object's exact mask minus its mean
# on the background (positive: the map prefers the object). `clipviz eval` computes the
# same number on whole datasets (see the evaluation notebook).

# %%
scenes = world.make_scenes(12, seed=7, n_objects=1)
images = [Image.fromarray(s.image) for s in scenes]
names = sorted({s.objects[0].name for s in scenes})
prompts = [world.class_prompt(n) for n in names]

contrast = {}
for method in ["itsm", "surgery", "gradcam", "legrad", "textspan", "attention", "random"]:
    exp = clipviz.explain(model, images, prompts, method)  # every image with every prompt
    values = []
    for i, s in enumerate(scenes):
        obj = s.objects[0]
        m = exp.upsampled(i, obj.mask.shape)[names.index(obj.name)].numpy()  # [H, W] in 0 … 1
        values.append(m[obj.mask].mean() - m[~obj.mask].mean())
    contrast[method] = round(float(np.mean(values)), 3)
    print(
        f"{method:10s} contrast {contrast[method]:+.3f}  positive on {np.sum(np.array(values) > 0)}/12"
    )

# %% [markdown]
# On this CLIP, stock ITSM prefers the background (the "semantic shift" of CLIP's patch
# tokens), while CLIP Surgery, the gradient methods and TextSpan follow the object;
# `random` (a seeded random map) is the floor every method should clear.

# %%
summary = {"contrast": contrast}
display(summary)
