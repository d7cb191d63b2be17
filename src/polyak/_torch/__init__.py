"""PyTorch side of polyak (imported on first use of a torch API)."""
