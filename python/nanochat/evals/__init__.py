"""Evaluations: CORE (core), the chat evals (chat), the commands base-eval, chat-eval and tok-eval, and the report
card (report) that gathers every stage's results. Bits per byte lives in nanochat.model.bpb (the weights guard
needs it below this layer)."""
