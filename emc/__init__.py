"""EMC: find where a fine-tune made a language model misaligned."""

__version__ = "0.1.0"
