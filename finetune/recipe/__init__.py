"""The training recipe (train.py) and its parts: data, plan, loss, memory (offload, host tables), bases."""
