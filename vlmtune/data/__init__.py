"""Data layer: formats in and out, pre-flight checks, encoding, synthetic datasets."""
