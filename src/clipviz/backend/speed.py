"""Running an image tower faster without changing what it computes: convolutions in
channels-last memory and its repeated units (blocks, residual stages) compiled by torch.compile.

Both act on the modules in place, so every path of every method that runs a unit whole (the
stock forward, blocks by index) gets them; explicit attention a method writes itself runs as
before. Results equal the eager ones up to the rounding of other kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import ClipvizError

if TYPE_CHECKING:
    from .base import Backend

COMPILE_BACKEND = "inductor"


def is_convolutional(visual: Any) -> bool:
    """Whether the tower is built of convolutions (a ViT has one, its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1


def use_channels_last(visual: Any) -> None:
    """Store the tower's 4-D weights channels-last: convolutions then run in that layout on
    any input (the first one converts it), which cuDNN's fastest kernels and tensor cores use."""
    visual.to(memory_format=torch.channels_last)


def _is_repeat(container: torch.nn.Module) -> bool:
    """A `ModuleList`/`Sequential` of composite modules of one class (blocks, stages), not a
    stem or head that happens to be a `Sequential` of different layers."""
    if not isinstance(container, torch.nn.ModuleList | torch.nn.Sequential) or not len(container):
        return False
    kinds = {type(m) for m in container}
    return len(kinds) == 1 and all(any(True for _ in m.children()) for m in container)


def repeated_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The elements of the outermost repeats under `module` (transformer blocks, ResNet
    bottlenecks, timm stages): the units the towers run whole."""
    units: list[torch.nn.Module] = []
    for child in module.children():
        if _is_repeat(child):
            units.extend(child.children())
        else:
            units.extend(repeated_units(child))
    return units


def _allow_compiled_units(units: int) -> None:
    """torch settings every compiled unit needs, set once for the process:
    - every unit is compiled through the same `Module._call_impl`, whose graphs share one
      cache: room for each unit's graphs (no gradients and with them, a fixed and a dynamic
      batch), else the units past torch's default of 8 would run uncompiled;
    - gradient methods backpropagate once per prompt through the same graph
      (`retain_graph`), which compiled backwards with donated buffers refuse."""
    import torch._dynamo.config
    import torch._functorch.config

    needed = 4 * units
    if torch._dynamo.config.recompile_limit < needed:
        torch._dynamo.config.recompile_limit = needed
    if torch._dynamo.config.accumulated_recompile_limit < needed:
        torch._dynamo.config.accumulated_recompile_limit = needed
    torch._functorch.config.donated_buffer = False


def compile_units(visual: Any, backend: Any = None) -> int:
    """Compile every repeated unit of the tower in place (`Module.compile`: names and weights
    stay as they are); returns how many. Compilation happens at each unit's first call."""
    units = repeated_units(visual)
    if not units:
        raise ClipvizError(
            "`compile`: this image tower has no blocks or stages to compile; run without it"
        )
    _allow_compiled_units(len(units))
    for unit in units:
        unit.compile(backend=backend or COMPILE_BACKEND)
    return len(units)


def warm_up(run: Any, what: str) -> None:
    """Run the compiled tower once, so that a compiler that cannot work here (no C++
    compiler, an unsupported operation) fails now, with one line, not on every batch."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - any failure of the compiler means the same to the user
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ClipvizError(
            f"`compile` failed for {what} ({type(e).__name__}: {first}); run without --compile"
        ) from e


def accelerate(
    backend: Backend, compile: bool = False, channels_last: bool | None = None
) -> Backend:
    """Apply the speed options to a loaded backend's image tower, in place; returns it.

    channels_last: None (default) chooses it for convolutional towers on CUDA, where it pays;
        True or False forces it (on CPU too).
    compile: compile the tower's blocks or stages with torch.compile (the first batch of
        each new shape waits for the compiler); a compiler that fails is a `ClipvizError`.
    """
    visual = backend.model.visual
    if channels_last is None:
        channels_last = backend.device.type == "cuda" and is_convolutional(visual)
    if channels_last:
        use_channels_last(visual)
    units = compile_units(visual) if compile else 0
    backend.speed = {"channels_last": bool(channels_last), "compiled_units": units}
    if units:
        probe = torch.zeros(1, 3, *backend.input_size, device=backend.device)
        warm_up(lambda: backend.image_embeddings(probe), str(backend.identity.get("model")))
    return backend
