"""Task heads on top of a model family's backbone."""

import flax.linen as nn
import jax.numpy as jnp

from llm.model.layers import Dense


class Classifier(nn.Module):
  """N-way classification from the backbone's one vector per sequence (`backbone.features`:
  a GPT's last non-padding token, a BERT's pooled [CLS]).

  Parameters: {"backbone": the family's own tree, "head": {"kernel" [D, N], "bias" [N]}}, so a
  pre-trained model's parameters drop in under "backbone".
  """
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, tokens_BxL, valid_BxL=None, deterministic=True):
    if valid_BxL is None:
      valid_BxL = jnp.ones(tokens_BxL.shape, bool)
    features_BxD = self.backbone.features(tokens_BxL, valid_BxL, deterministic)
    logits_BxC = Dense((self.backbone.cfg.d_model, self.num_classes), ("embed", None),
                       name="head")(features_BxD)
    return logits_BxC.astype(jnp.float32)
