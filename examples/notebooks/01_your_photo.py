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
# # Where does CLIP look in your own photo?
#
# CLIP scores how well an image matches a text. A saliency map shows *where* in the image
# that match comes from. This notebook explains one photo against a few prompts, shows the
# maps over the photo, and saves them.
#
# It runs offline on clipviz's **test bed**: a tiny CLIP trained on a generated world of
# coloured shapes on cluttered backgrounds (trained once and cached, about two minutes on a
# laptop's CPU). With network, use a real CLIP instead (the cell below says how) and point
# `PHOTO` at your own picture.

# %%
import os
import tempfile
from pathlib import Path

import numpy as np
from IPython.display import display
from PIL import Image, ImageOps

import clipviz
from clipviz.testbed import world
from clipviz.testbed.tinyclip import ensure_tiny_clip

# %% [markdown]
# ## The model
#
# With network, the default model is one line:
#
# ```python
# model = clipviz.load_model()                      # ViT-B-16 with OpenAI's weights
# model = clipviz.load_model("ViT-L-14", "openai")  # any open_clip architecture and tag
# ```
#
# Here we load the test bed's tiny CLIP through the same function, as a user's own weights
# file would be loaded (`model_config` names the architecture, `pretrained` the weights).

# %%
cache = Path(os.environ.get("CLIPVIZ_TESTBED_CACHE") or Path.home() / ".cache/clipviz-testbed")
tiny = ensure_tiny_clip(cache)  # trains on first use, then reads the cache
model = clipviz.load_model(
    model_config=tiny.config_path, pretrained=str(tiny.weights_path), device="cpu"
)

# %% [markdown]
# ## The photo
#
# Set `PHOTO` to the path of your image (with a real model: `PHOTO = "../photos/cat.jpg"`
# and prompts such as `["a cat", "a sofa", "a dog"]`). Left at `None`, the notebook draws a
# scene of the test bed's world, which the tiny CLIP knows, and saves it to a file, so
# both cases load a picture from a path.

# %%
PHOTO: str | None = None
OUT = Path(tempfile.mkdtemp(prefix="clipviz-photo-"))  # where this notebook writes

scene = None
if PHOTO is None:
    scene = world.make_scenes(1, seed=2, n_objects=1)[0]
    PHOTO = str(OUT / "scene.png")
    Image.fromarray(scene.image).save(PHOTO)
    target = scene.objects[0].name  # e.g. "red circle"
    others = [c for c in world.COLOURS if c != scene.objects[0].colour][:2]
    PROMPTS = [world.class_prompt(target)] + [
        world.class_prompt(f"{c} {scene.objects[0].shape}") for c in others
    ]
else:
    PROMPTS = ["a cat", "a sofa", "a dog"]

photo = ImageOps.exif_transpose(Image.open(PHOTO)).convert("RGB")  # upright, as taken
print(PHOTO, photo.size, PROMPTS)
small = photo.width < 192  # a 64-px scene: enlarged for the eye
display(photo.resize((photo.width * 3, photo.height * 3), Image.NEAREST) if small else photo)

# %% [markdown]
# ## Explain it
#
# `clipviz.explain` runs one method (ITSM, the image–text similarity map, by default) over a
# batch of images and a list of prompts. Each prompt goes through CLIP's template ensemble
# ("a photo of a …", …). The result holds the raw maps `[B, T, h, w]` at the model's patch
# grid, the cosine scores `[B, T]` and the model's probabilities over the prompts.

# %%
exp = clipviz.explain(model, [photo], PROMPTS)
print("maps", tuple(exp.maps.shape), "(images, prompts, rows, columns)")
for prompt, p in zip(exp.prompts, exp.probs[0].tolist(), strict=True):
    print(f"{p:6.3f}  {prompt}")

# %% [markdown]
# In a notebook an explanation shows itself: the photo, then each prompt's map over it,
# with the model's probability and a colorbar (red is high).

# %%
display(exp)

# %% [markdown]
# ## Another method
#
# Stock ITSM on CLIP often lights up the background rather than the object (the "semantic
# shift" the ECLIP and CLIP Surgery papers describe). CLIP Surgery removes what all
# prompts share from the patch features; `clipviz.METHODS` lists every method.

# %%
print(sorted(clipviz.METHODS))
surgery = clipviz.explain(model, [photo], PROMPTS, "surgery")
fig = surgery.show()  # a matplotlib figure: save it with fig.savefig(...)

# %% [markdown]
# ## Overlays and arrays
#
# `overlay` gives the same picture as the overlay PNGs of `clipviz explain`, as a PIL image
# to save or paste; `upsampled` gives the min-max normalised maps at any size, to compute
# with; `clipviz.overlay` puts any map over any image.

# %%
surgery.overlay(0, PROMPTS[0]).save(OUT / "overlay.png")
maps = surgery.upsampled(0, (photo.height, photo.width))  # [T, H, W], each in 0 … 1
print("saved", OUT / "overlay.png", "maps", tuple(maps.shape))
display(clipviz.overlay(photo, surgery.maps[0, 0], colormap="viridis", alpha=0.6))

# %% [markdown]
# ## Does the map fall on the object?
#
# The test bed knows every object's exact mask, so we can measure what a photo cannot
# tell us: the mean of the normalised map on the object minus its mean on the background
# (the *score contrast*; positive means the map prefers the object).

# %%
contrast = {}
if scene is not None:
    mask = scene.objects[0].mask
    for e in (exp, surgery):
        m = e.upsampled(0, mask.shape)[0].numpy()
        contrast[e.method] = round(float(m[mask].mean() - m[~mask].mean()), 3)
display(contrast)

# %% [markdown]
# What this notebook found: the prompt the model ranks first, and each method's contrast.

# %%
summary = {
    "top_prompt": exp.prompts[int(np.argmax(exp.probs[0].numpy()))],
    "prompts": PROMPTS,
    "contrast": contrast,
}
display(summary)
