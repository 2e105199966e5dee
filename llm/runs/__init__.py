"""A run as a whole: its directory (rundir.py), its set-up from a config (startup.py), the train
loop (trainer.py), a saved run or a Hugging Face model opened with its parameters (loading.py,
hf.py), and its train step compiled ahead of time for a TPU slice (ahead_of_time.py)."""
