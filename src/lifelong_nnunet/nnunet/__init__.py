"""The only sub-package that touches nnunetv2 internals.

Pinned to nnunetv2 2.8.1: planning, the trainer, the predictor and the stock export live here, so an upgrade
of nnU-Net changes this folder and nothing else.
"""
