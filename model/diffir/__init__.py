"""DiffIR (Xia et al., ICCV 2023): a compact-prior diffusion restorer, networks and loading."""

from model.diffir.convert import diffir_from_original, load_diffir, save_diffir
from model.diffir.models import DiffIRS1, DiffIRS2
from model.diffir.padding import pad_window, restore_padded

__all__ = [
    "DiffIRS1",
    "DiffIRS2",
    "diffir_from_original",
    "load_diffir",
    "pad_window",
    "restore_padded",
    "save_diffir",
]
