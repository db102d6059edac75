"""Generation: the Engine (engine) over a continuous-batching Scheduler (scheduler) with its row table (rows) and
python-tool state machine (tool_calls), a preallocated KV cache with prefix reuse (kv_cache), token sampling
(sampling) and incremental detokenization (text_stream). Tool calls made by the model run through nanochat.tools."""
