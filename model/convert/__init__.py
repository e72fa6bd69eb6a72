"""Conversion between the released checkpoints (original latent-diffusion layout) and ours.

One module per network holds its key table as data (`unet`, `controlnet`, `vae`,
`text_encoder`); `sd` splits and joins the SD checkpoint layout, `v1_full` splits the v1
Lightning checkpoints, and `cldm` builds a ControlLDM from original files. Every conversion is
a key rename (plus the VAE's 1x1-conv <-> linear reshape), so original -> ours -> original
gives back the same tensors.
"""

from model.convert.cldm import cldm_from_original

__all__ = ["cldm_from_original"]
