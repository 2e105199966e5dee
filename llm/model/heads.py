"""Task heads on top of a model family's backbone."""

import flax.linen as nn
import jax.numpy as jnp

from llm.model import moe
from llm.model.layers import Dense


@moe.records
class Classifier(nn.Module):
  """N-way classification from the backbone's one vector per sequence (`backbone.features`:
  a GPT's last non-padding token, a BERT's pooled [CLS]).

  Parameters: {"backbone": the family's own tree, "head": {"kernel" [D, N], "bias" [N]}}, so a
  pre-trained model's parameters drop in under "backbone".
  """
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, tokens_BxL, valid_BxL=None, deterministic=True, documents_BxL=None,
               positions_BxL=None, ends_BxS=None):
    """logits [B, C]; for sequences packed into rows (a decoder's `documents_BxL`,
    `positions_BxL`), one per sequence read at its last token `ends_BxS`: [B, S, C]."""
    if ends_BxS is not None:
      features = self.backbone.features_at(tokens_BxL, positions_BxL, documents_BxL, ends_BxS,
                                           deterministic)
    else:
      if valid_BxL is None:
        valid_BxL = jnp.ones(tokens_BxL.shape, bool)
      features = self.backbone.features(tokens_BxL, valid_BxL, deterministic)
    logits = Dense((self.backbone.cfg.d_model, self.num_classes), ("embed", None),
                   name="head")(features)
    return logits.astype(jnp.float32)
