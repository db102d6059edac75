"""Pretraining data: parquet shards and their download (shards), the streaming tokenizing loader (loader), shards
from a user's files (from_files), the offline demo corpus from Debian packages (offline_corpus, debian_sources,
plaintext) and the `nanochat data` command (cli)."""
