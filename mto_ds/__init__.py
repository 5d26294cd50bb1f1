"""mto_ds: MIM pre-training of ViTs with Masked Token Optimization on DeepSpeed."""
__version__ = "0.1.0"
