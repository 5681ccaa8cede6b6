"""Training: the launcher, the launch plan, the machine facts it reads, SFTTrainer and checkpoints."""
