"""Backbones: the text-to-video UNets vmc-fast can tune, behind one small interface (see registry)."""

from vmc_fast.models.registry import Backbone, available_models, load_backbone, register

__all__ = ["Backbone", "available_models", "load_backbone", "register"]
