"""The only code that touches open_clip: loading, network/offline handling, text encoding and
its caches, and per image-tower family an adapter (registered in `towers.py`) that gives the
methods the token stream, attention q/k/v, the pooling head and the grid."""

from .base import Backend, Precision
from .loading import load_backend, resolve_device
from .preprocess import Crop, Preprocess
from .resnet import ResNetTower
from .text import Texts, ensemble_templates
from .timm_conv import TimmConvTower
from .timm_stage import TimmStageTower
from .timm_vit import TimmViTTower
from .towers import (
    ConvMapTower,
    LinearHeadTower,
    ReadoutTower,
    ResNetPoolTower,
    TokenTower,
    Tower,
    register_adapter,
    tower_adapter,
)
from .vit import ViTTower
from .wrap import from_open_clip, from_transformers

__all__ = [
    "Backend",
    "ConvMapTower",
    "Crop",
    "LinearHeadTower",
    "Precision",
    "Preprocess",
    "ReadoutTower",
    "ResNetPoolTower",
    "ResNetTower",
    "Texts",
    "TimmConvTower",
    "TimmStageTower",
    "TokenTower",
    "Tower",
    "TimmViTTower",
    "ViTTower",
    "ensemble_templates",
    "from_open_clip",
    "from_transformers",
    "load_backend",
    "register_adapter",
    "resolve_device",
    "tower_adapter",
]
