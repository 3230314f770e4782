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
# # Inside the tower: layers and attention heads
#
# A CLIP ViT builds its image embedding over several blocks, each with several attention
# heads. This notebook looks inside:
#
# 1. **TextSpan's per-head maps**: through the last layer norm and the projection, the image
#    embedding is a sum of direct contributions of every block's heads and MLPs; TextSpan
#    splits each head's contribution over the patches it attends to and reads it along the
#    prompt's text embedding. The method's map is the sum of the heads' maps.
# 2. **`clipviz heads`**: which texts each head writes, over a set of images.
# 3. **Grad-CAM at several blocks**: where the gradient of the image–text score points as
#    we read earlier and earlier blocks.
#
# It runs on the test bed's tiny CLIP (4 blocks of 4 heads, 8 × 8 patches); with network,
# `clipviz.load_model("ViT-B-16", "openai")` has 12 blocks of 12 heads and the same calls
# apply.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from PIL import Image

import clipviz
from clipviz.data.inputs import collect_inputs
from clipviz.maps import upsample_normalized
from clipviz.runs.heads import TextBank, collect_head_embeddings, describe_heads, write_heads
from clipviz.testbed import world
from clipviz.testbed.tinyclip import ensure_tiny_clip

cache = Path(os.environ.get("CLIPVIZ_TESTBED_CACHE") or Path.home() / ".cache/clipviz-testbed")
tiny = ensure_tiny_clip(cache)
model = clipviz.load_model(
    model_config=tiny.config_path, pretrained=str(tiny.weights_path), device="cpu"
)
OUT = Path(tempfile.mkdtemp(prefix="clipviz-heads-"))


def contrast(norm_map: np.ndarray, mask: np.ndarray) -> float:
    """Mean of a normalised map on the object minus its mean on the background."""
    return float(norm_map[mask].mean() - norm_map[~mask].mean())


# %% [markdown]
# ## 1. TextSpan: one map per head
#
# `explain(..., "textspan")` keeps the per-head maps in `extras["head_maps"]`
# `[B, T, heads, h, w]`, named in `labels["heads"]` (`L<block>.H<head>`). By default every
# block's heads are decomposed (`options={"layers": 2}` keeps the last two).

# %%
scene = world.make_scenes(1, seed=5, n_objects=1)[0]
obj = scene.objects[0]
image = Image.fromarray(scene.image)
prompt = world.class_prompt(obj.name)

exp = clipviz.explain(model, [image], [prompt], "textspan")
head_maps = exp.extras["head_maps"][0, 0]  # [heads, h, w]
heads = exp.labels["heads"][0]
sum_gap = float((head_maps.sum(0) - exp.maps[0, 0]).abs().max())
print(f"{len(heads)} heads; largest gap between their sum and the map: {sum_gap:.2e}")

# %% [markdown]
# Each head's map over the scene, titled with its score contrast (the normalised map's
# mean on the object minus its mean on the background): some heads carry the object,
# others the background.

# %%
mask = torch.from_numpy(obj.mask)
size = tuple(mask.shape)
head_contrast = {}
fig, axes = plt.subplots(1 + len(heads) // 8, 8, figsize=(14, 2 * (1 + len(heads) // 8)))
axes[0, 0].imshow(image)
axes[0, 0].set_title(prompt, fontsize=8)
for k, name in enumerate(heads):
    norm = upsample_normalized(head_maps[k : k + 1], size)[0].numpy()
    head_contrast[name] = round(contrast(norm, obj.mask), 3)
    ax = axes.flat[k + 1]
    ax.imshow(clipviz.overlay(image, head_maps[k]))
    ax.set_title(f"{name} {head_contrast[name]:+.2f}", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()
best = max(head_contrast, key=head_contrast.get)
print("the head that follows the object most:", best, head_contrast[best])

# %% [markdown]
# ## 2. Which texts does each head write? (`clipviz heads`)
#
# Over a set of images, each head is described by the texts along which its direct
# contribution varies most (greedy; each chosen text's direction is removed before the
# next), with the share of the head's variance they explain. From the shell:
#
# ```bash
# clipviz heads photos/ --layers 4 --per-head 10 -o heads.json       # WordNet concepts
# clipviz heads photos/ --texts descriptions.txt                      # your own texts
# ```
#
# The library calls behind it: collect the heads' contributions over a folder of images,
# then describe them with a text bank. Here the bank is the test bed's words: its
# colours, its shapes and its class names.

# %%
world.write_generic(OUT / "scenes", 32, seed=3)
items, _ = collect_inputs([str(OUT / "scenes" / "images")])
data, names, failed = collect_head_embeddings(model, items, layers=4, batch_size=16)
print("contributions", tuple(data.shape), "(images, heads, embedding)", "unreadable:", failed)

texts = [*world.COLOURS, *world.SHAPES, *(world.class_prompt(c) for c in world.CLASSES)]
bank = TextBank(texts, torch.stack(model.embed_texts(texts, ensemble=False)))
# 3 texts per head, read in the span of the head's top 16 output directions (the shell's
# defaults, `--per-head 10 --rank 80`, suit a real CLIP's 512 or 768 dimensions)
described = describe_heads(data, names, bank, count=3, rank=16)
for d in described:
    print(f"{d.head:6s} explains {d.explained:.2f}: {' | '.join(d.texts)}")
write_heads(OUT / "heads.json", model, described, {"images": len(items), "texts": len(texts)})

# %% [markdown]
# ## 3. Grad-CAM block by block
#
# Grad-CAM reads one block's tokens and weights them by the gradient of the image–text
# score (`options={"layer": -1}` is the last block, `-2` the one before, …). On 12 scenes,
# the contrast of each block's map with the object's mask:

# %%
scenes = world.make_scenes(12, seed=7, n_objects=1)
images = [Image.fromarray(s.image) for s in scenes]
names_present = sorted({s.objects[0].name for s in scenes})
prompts = [world.class_prompt(n) for n in names_present]
layer_contrast = {}
for layer in (-1, -2, -3, -4):
    cam = clipviz.explain(model, images, prompts, "gradcam", options={"layer": layer})
    values = [
        contrast(
            cam.upsampled(i, s.objects[0].mask.shape)[
                names_present.index(s.objects[0].name)
            ].numpy(),
            s.objects[0].mask,
        )
        for i, s in enumerate(scenes)
    ]
    layer_contrast[layer] = round(float(np.mean(values)), 3)
    print(f"layer {layer:+d}: contrast {layer_contrast[layer]:+.3f}")

fig, axes = plt.subplots(1, 5, figsize=(11, 2.4))
axes[0].imshow(images[0])
for ax, layer in zip(axes[1:], (-1, -2, -3, -4), strict=True):
    cam = clipviz.explain(model, images[:1], prompts, "gradcam", options={"layer": layer})
    ax.imshow(cam.overlay(0, world.class_prompt(scenes[0].objects[0].name)))
    ax.set_title(f"Grad-CAM, layer {layer}", fontsize=8)
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# What this notebook found: the heads' maps add up to TextSpan's map, the head that
# follows the object most, the heads' descriptions and Grad-CAM's contrast per block.

# %%
summary = {
    "heads": len(heads),
    "sum_gap": sum_gap,
    "best_head": best,
    "best_head_contrast": head_contrast[best],
    "described": len(described),
    "explained": [d.explained for d in described],
    "gradcam_contrast": layer_contrast,
}
display(summary)
