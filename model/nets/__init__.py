"""Networks: the stage-1 SwinIR (and other stage-1 cleaners), the UNet/VAE/text-encoder builders,
the LAControlNet and the ControlLDM that joins them."""
