"""JAX twin of the Transformer and LoRA (pure functions over parameter trees)."""
