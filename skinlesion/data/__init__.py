"""The data phase: download, prepare, split, balance (stages of the same names)."""
