"""Using a trained model: sampling with a KV cache (sampling.py), and scoring answers with a
reward model, best-of-n included (scoring.py)."""
