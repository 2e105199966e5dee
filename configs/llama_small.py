"""A Llama-style model of GPT-2 small's size, on the same data with the same recipe as
configs/gpt_small.py: rotary positions, RMSNorm, a SwiGLU MLP, grouped-query attention (4 key/value
heads for 12 query heads), no biases, an untied output head.

    python -m llm.train --config=configs/llama_small.py --workdir=runs/llama_small
    python -m llm.train --config=configs/llama_small.py:tiny --workdir=runs/llama_small_tiny

The gated MLP's width is 2048 (about 8/3 x 768) so that its three matrices hold as many weights as
GPT-2's two of width 3072. An ablation against GPT-2 is this file against gpt_small.py; a single
block is one override, e.g. --config.model.positions=learned.
"""

from configs import gpt_small


def get_config(arg=None):
  c = gpt_small.get_config(arg)
  c.model.update(positions="rope", rope_theta=10000.0, norm="rmsnorm", ln_eps=1e-5, mlp="gated",
                 activation="silu", num_kv_heads=4, use_bias=False, tie_embeddings=False)
  if arg != "tiny":
    c.model.d_ff = 2048
  else:  # gpt_small:tiny's 2 x 128 with 2 heads: 1 key/value head, a gated MLP of 3 x 128
    c.model.update(num_kv_heads=1, d_ff=384)
  return c
