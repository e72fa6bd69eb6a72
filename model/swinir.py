"""The stage-1 SwinIR at its contract import path (`from model.swinir import SwinIR`); the
network lives in `model.nets.swinir`."""

from model.nets.swinir import SwinIR, load_swinir, swinir_diffbir_config

__all__ = ["SwinIR", "load_swinir", "swinir_diffbir_config"]
