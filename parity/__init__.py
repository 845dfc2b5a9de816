"""Weight conversion between the twins and the parity ladder that compares them."""
