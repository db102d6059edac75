"""What a model may call while it generates, and what scores model-written code: the calculator (a restricted
arithmetic evaluator, never `eval`) and the sandbox (a subprocess with time, memory, file and network limits)."""
