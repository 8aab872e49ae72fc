"""Small model definitions hookscope ships (plain torch modules, no hookscope imports)."""

from hookscope.models.vit import ViT

__all__ = ["ViT"]
