"""Training: one loop (loop.py) shared by pretraining, SFT and DPO; each stage supplies a Task."""
