"""Conversion of PyTorch XCiT checkpoints to Paddle; see ``convert.py``."""
