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
# # Open-vocabulary segmentation from saliency maps
#
# Give a list of class names, get a label for every pixel: the training-free segmentors of
# the CLIP literature (MaskCLIP, SCLIP, ClearCLIP, NACLIP, …) do it by scoring every patch
# against every name. clipviz runs them by the field's protocol: resize, slide windows,
# merge, optionally refine (PAMR), then a softmax over the names; any dense method of
# `clipviz.METHODS` can feed it.
#
# From the shell: `clipviz segment photos/ --classes-file classes.txt --preset sclip/voc21`.
# With network, `clipviz.load_model()` and a benchmark's class names
# (`clipviz.segment.benchmark_classes("voc21")`) reproduce the papers' setting; here the
# test bed's tiny CLIP segments its own world.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from PIL import Image

import clipviz
from clipviz.segment import IoUMetric, Protocol, Segmenter, get_preset, parse_classes
from clipviz.testbed import world
from clipviz.testbed.tinyclip import ensure_tiny_clip

cache = Path(os.environ.get("CLIPVIZ_TESTBED_CACHE") or Path.home() / ".cache/clipviz-testbed")
tiny = ensure_tiny_clip(cache)
model = clipviz.load_model(
    model_config=tiny.config_path, pretrained=str(tiny.weights_path), device="cpu"
)

# %% [markdown]
# ## Classes, with synonyms
#
# A classes file holds one class per line, in label order; class 0 is background. Several
# names on a line are synonyms: each is scored and the class takes its best name. The tiny
# CLIP knows colours far better than shapes, so here each class is a colour, named by
# every shape of that colour.

# %%
text = "background\n" + "\n".join(
    ", ".join(f"{colour} {shape}" for shape in world.SHAPES) for colour in world.COLOURS
)
print(text)
classes = parse_classes(text)
print(len(classes), "classes:", classes.labels)

# %% [markdown]
# ## The protocol's settings
#
# A `Preset` holds a published segmentor's settings (method, resize, window, thresholds);
# `Protocol` holds the settings themselves. The presets are for real images at 224 px
# windows; the test bed's scenes are 64 px, so we scale the windows down.

# %%
print(get_preset("sclip/voc21").protocol)
protocol = Protocol(short_side=128, window=64, stride=32)  # 3 × 3 windows per scene
print(protocol)

# %% [markdown]
# ## Segment, and score against the exact masks
#
# A `Segmenter` embeds the names once (each in CLIP's 80 ImageNet templates) and segments
# batches of images; each result holds the labels at the image's own size. `IoUMetric`
# is mmseg's: intersections and unions summed over the images, IoU per class, mIoU.


# %%
def colour_labels(scene: world.Scene) -> np.ndarray:
    """The scene's true label map in these classes: 0 background, 1 + the colour's index."""
    labels = np.zeros(scene.image.shape[:2], np.int64)
    for obj in scene.objects:  # in drawing order: later objects cover earlier ones
        labels[obj.mask] = 1 + list(world.COLOURS).index(obj.colour)
    return labels


scenes = world.make_scenes(16, seed=11)
truth = [colour_labels(s) for s in scenes]
segmented = {}
miou = {}
for method in ("itsm", "clearclip", "naclip"):
    results = Segmenter(model, classes, method, protocol)([s.image for s in scenes])
    metric = IoUMetric(len(classes))
    for result, labels in zip(results, truth, strict=True):
        metric.add(result.labels, labels)
    segmented[method] = results
    miou[method] = metric.summary(classes.labels)["mIoU"]
    print(
        f"{method:9s} mIoU {miou[method]:5.1f} %   per class:",
        metric.summary(classes.labels)["IoU"],
    )

# %% [markdown]
# The label maps beside the truth, each class in its own colour (background black). Stock ITSM's patch tokens carry the
# "semantic shift" (the background's patches look like the objects), so its labels
# scatter; ClearCLIP and NACLIP, which repair the last block's attention, follow the
# objects. The tiny CLIP never saw the word "background", so background pixels mostly
# take an object's class (its IoU stays low); `Protocol(prob_thd=...)` sends the pixels
# whose best probability is under the threshold to class 0, as SCLIP's presets do.

# %%
palette = np.array([(0, 0, 0), *world.COLOURS.values()], np.uint8)  # class -> RGB
methods = list(segmented)
fig, axes = plt.subplots(4, 2 + len(methods), figsize=(2 * (2 + len(methods)), 8))
for row in range(4):
    axes[row, 0].imshow(scenes[row].image)
    axes[row, 1].imshow(palette[truth[row]])
    for col, method in enumerate(methods, start=2):
        axes[row, col].imshow(palette[segmented[method][row].labels])
for col, title in enumerate(["image", "truth", *methods]):
    axes[0, col].set_title(title, fontsize=9)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# With `keep_probs=True` each result also holds the class probabilities `[K, H, W]`, e.g.
# to draw the probability of the first scene's first object's class over the image:

# %%
k = 1 + list(world.COLOURS).index(scenes[0].objects[0].colour)
probs = Segmenter(model, classes, "naclip", protocol)([scenes[0].image], keep_probs=True)[0].probs
print("probabilities", tuple(probs.shape), "(classes, rows, columns); shown:", classes.labels[k])
display(clipviz.overlay(Image.fromarray(scenes[0].image), probs[k]).resize((192, 192)))

# %% [markdown]
# What this notebook found: mIoU % of each method on the 16 scenes.

# %%
summary = {"miou": miou}
display(summary)
