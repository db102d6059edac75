"""The training stages, one module each with a `main(argv)`: tok_train, base_train, mid_train, chat_sft, chat_rl.
No stage imports another; what they share is in flags (the command line), loop (the pieces of a stage's loop and
its state) and log (train_log.jsonl and metrics.json). What a checkpoint of a run holds is model/resume.py's."""
