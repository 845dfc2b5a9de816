"""Speed measurements of the twins; run each module with ``python -m``."""
