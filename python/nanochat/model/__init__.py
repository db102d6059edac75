"""The model: the GPT and its architecture switches (gpt), Muon + AdamW (optim), learning-rate and momentum
schedules, the checkpoint format and its loaders (checkpoint), inference weight formats and their quality guard
(quantize), bits per byte (bpb) and tiny models for tests and benchmarks (tiny)."""
