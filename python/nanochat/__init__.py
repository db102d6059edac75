"""nanochat: from raw web text to a ChatGPT-style assistant on hardware a person can rent."""

__version__ = "0.1.0"
