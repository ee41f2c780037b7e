"""Scale-out applied to the model from outside it: activation checkpointing, torch.compile, FSDP2."""
