"""nanochat: from raw web text to a ChatGPT-style assistant on hardware a person can rent.

The package is layered; a module imports only from its own layer or the layers below it (the import-linter
contracts in pyproject.toml enforce this in CI, tests/test_layers.py):

    cli                              the `nanochat` command: dispatches to each stage's main(argv)
    serve | hf | training            front ends (HTTP server + web UI, terminal chat); transformers export and
                                     the importer of Karpathy's checkpoints; the training stages
    evals                            bits per byte, CORE, the chat evals, the report card
    data                             pretraining shards: download, read, build from files or Debian packages
    tasks                            datasets as conversations (chat stages and chat evals)
    inference                        engine, continuous-batching scheduler, KV cache, sampling, text stream
    tools                            what a model may call: the calculator and the code sandbox
    model                            the GPT, its optimizer and schedules, checkpoints, weight formats
    tokenizer                        the BPE tokenizer (Rust fast path, Python reference) and chat rendering
    runtime                          the process's device, precision (one rule for every path), compilation,
                                     threads, and its place in a torchrun job
    common                           paths, atomic writes, errors, logging, reductions over ranks, provenance

`a | b` are independent: neither imports the other. Triton kernels live in the separate package
`nanochat_kernels` (kernels/), which never imports nanochat.
"""

__version__ = "0.1.0"
