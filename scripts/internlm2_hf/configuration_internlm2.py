"""InternLM2's config for transformers, written by xlab-deploy from the architecture (no hub code).

Field names and defaults follow the config.json that InternLM2-chat-7B publishes, so LMDeploy and
this folder's modeling_internlm2.py read the same file. Kept out of the `deploy` package: the kit
never needs it; scripts/make_random_internlm2.py --modeling copies it into a checkpoint.
"""

from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=92544, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
                 rms_norm_eps=1e-5, use_cache=True, pad_token_id=2, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, bias=False, rope_theta=1_000_000,
                 rope_scaling=None, attn_implementation="eager", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attn_implementation = attn_implementation
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)
