"""Example Axolotl configs, DeepSpeed JSONs and study run files, shipped as ``axolotl_treft.example_yamls``."""
