"""The diffusion layer: training schedules, samplers (one visible loop each), classifier-free
guidance, latent image guidance and tiled diffusion, all over a model function
model_fn(x, t, cond)."""
