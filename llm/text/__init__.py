"""Text in and out of token ids: tokenizers (tokenizer.py), chat templates (chat.py), and how a
record becomes a prompt and its completion (prompts.py)."""
