"""Generation: the Engine (engine) over a continuous-batching Scheduler (scheduler) that owns a paged KV cache with
prefix reuse (kv_cache), token sampling (sampling) and incremental detokenization (text_stream). Tool calls made by
the model run through nanochat.tools."""
