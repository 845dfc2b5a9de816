"""PyTorch twin of the Transformer and LoRA (imperative ``nn.Module`` code)."""
