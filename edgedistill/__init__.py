"""edgedistill: teacher LM -> small, fast, verified edge artifacts -> served."""

__version__ = "0.1.0"
