"""Evaluations: bits per byte (`bpb`), the CORE benchmark (`core`) and the chat evals."""
