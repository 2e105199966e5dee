"""A mixture of experts with the active parameters of configs/llama_small.py: the same Llama
blocks, with each block's SwiGLU MLP of width 2048 replaced by 8 experts of width 1024, each
token routed to 2 of them (Mixtral's router: softmax, top 2, renormalised), so a token computes
with as many weights as in the dense model while the model holds about 2.4x its parameters.

    python -m llm.train --config=configs/moe_small.py --workdir=runs/moe_small
    python -m llm.train --config=configs/moe_small.py:tiny --workdir=runs/moe_small_tiny

The ablation "dense against MoE at equal active parameters" is this file against
llama_small.py (docs/models.md has the numbers). Experts split over devices with
--config.mesh.expert=N (N divides 8; the batch is split over it too).
"""

from configs import llama_small


def get_config(arg=None):
  c = llama_small.get_config(arg)
  dense_d_ff = c.model.d_ff
  c.model.moe.update(num_experts=8, experts_per_token=2, expert_d_ff=dense_d_ff // 2,
                     router="softmax", renormalize=True, balance_loss=0.01, z_loss=0.001)
  return c
