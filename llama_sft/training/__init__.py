"""Training: the SFTTrainer, its callbacks, the checkpoint protocol, signals, W&B, test-only
faults, the run recipe shared by llama_train.py and llama_pilot.py, and the two stages."""
