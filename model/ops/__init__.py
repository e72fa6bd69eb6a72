"""Image operations shared by the stages: tiling, sizing and colour fixes."""
