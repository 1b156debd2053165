"""Sequential fine-tuning: each stage starts from the last one and sees only its own task. The lower bound."""
from .base import Method


class Sequential(Method):
    name = "sequential"
