"""The training stages, one module each with a `main(argv)`: tok_train, base_train, mid_train, chat_sft, chat_rl,
and what they share (plumbing)."""
