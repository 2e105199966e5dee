"""Text in and out of token ids: tokenizers (tokenizer.py: the interface and the registry of
tokenizer.kind; sentencepiece.py, gpt2.py, huggingface.py: the kinds), chat templates (chat.py),
and how a record becomes a prompt and its completion (prompts.py)."""

from llm.text import gpt2, huggingface, sentencepiece  # noqa: F401 (they register their kinds)
