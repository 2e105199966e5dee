"""BERT-base (Devlin et al. 2019): 12 layers, width 768, 12 heads, 512 positions, 30,522 tokens.

    python -m llm.train --config=configs/bert_base.py --workdir=gs://bucket/runs/bert_base \
        --config.data.hf_name=... --config.mesh.fsdp=-1

The paper's optimiser: Adam at 1e-4 (beta2 0.999), weight decay 0.01, 10,000 warmup steps then
linear-like decay, batch 256 sequences, 1M steps. Uncased WordPiece, trained on the run's text
unless --config.tokenizer.path names a vocab.txt.
"""

from llm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.update(kind="bert", num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_len=512,
                 vocab_size=30522, dropout=0.1, pre_ln=False, activation="gelu", ln_eps=1e-12,
                 dtype="bfloat16")
  c.tokenizer.update(kind="wordpiece", vocab_size=30522, lowercase=True)
  c.task.kind = "mlm"
  c.data.update(hf_name="wikimedia/wikipedia", hf_config="20231101.en", max_length=512,
                val_fraction=0.001)
  c.train.update(steps=1_000_000, batch_size=256, lr=1e-4, min_lr=0.0, warmup_steps=10_000,
                 weight_decay=0.01, b1=0.9, b2=0.999, log_every=100, eval_every=10_000,
                 eval_batches=50, checkpoint_every=10_000)
  return c
