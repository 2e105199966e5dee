"""Speed and memory, measured side by side in one process: `python -m llm.bench` (__main__.py)
runs one module per benchmark; the PyTorch references live apart (torch_reference.py)."""
