"""Pipelines: DiffBIRPipeline (from_pretrained), its options, the release presets and faces."""
