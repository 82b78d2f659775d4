"""saeflow: feature flow across the layers of a language model, from SAE weights."""

__version__ = "0.1.0"
