"""vimpac-jax: VIMPAC video pre-training (masked token prediction + contrastive) in JAX/Flax."""

__version__ = "0.1.0"
