"""Training: Lightning systems for both stages, optimisers, export, YAML instantiation."""
