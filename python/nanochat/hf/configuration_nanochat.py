"""Configuration of an exported nanochat GPT for Hugging Face transformers (copied into the export folder).

The fields are those of nanochat.model.gpt.GPTConfig (its architecture switches included, with the same defaults) plus
the rotary table length; the usual transformers names (hidden_size, num_hidden_layers, ...) are aliases.
"""

from __future__ import annotations

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class NanochatConfig(PreTrainedConfig):
    model_type = "nanochat"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head"}

    def __init__(self, vocab_size: int = 65536, sequence_len: int = 2048, n_layer: int = 20, n_head: int = 10,
                 n_kv_head: int = 10, n_embd: int = 1280, rotary_base: float = 10_000.0,
                 rotary_len_factor: int = 10, logit_softcap: float = 15.0, ve_layers=(), ve_gate_channels: int = 32,
                 ve_gate_scale: float = 2.0, lambdas: bool = False, smear: bool = False, backout: bool = False,
                 qk_scale: float = 1.0, rotary_dtype: str = "float32", window_pattern: str = "",
                 short_window: int = 0, pad_vocab_to: int = 1, **kwargs):
        self.vocab_size = vocab_size
        self.sequence_len = sequence_len
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.rotary_base = rotary_base
        self.rotary_len_factor = rotary_len_factor
        self.logit_softcap = logit_softcap
        self.ve_layers = list(ve_layers)
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_scale = ve_gate_scale
        self.lambdas = lambdas
        self.smear = smear
        self.backout = backout
        self.qk_scale = qk_scale
        self.rotary_dtype = rotary_dtype
        self.window_pattern = window_pattern
        self.short_window = short_window
        self.pad_vocab_to = pad_vocab_to
        self.max_position_embeddings = rotary_len_factor * sequence_len  # the rotary table of the original model
        self.padded_vocab_size = -(-vocab_size // pad_vocab_to) * pad_vocab_to
        kwargs.setdefault("tie_word_embeddings", False)  # untied embedding and lm_head
        super().__init__(**kwargs)
