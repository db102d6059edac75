"""The Hugging Face `transformers` classes of an exported model (see nanochat/hf/export.py).

The two modules here are copied verbatim into every exported folder and loaded by transformers with
`trust_remote_code=True`; they import only torch and transformers, never nanochat.
"""
