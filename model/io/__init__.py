"""Files: safe checkpoint reading, the weight registry and hub downloads, image decoding and
encoding, folder jobs (inputs, outputs, sidecars, atomic writes)."""
