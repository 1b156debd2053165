"""The only sub-package of lifelong_nnunet that imports nnunetv2 or dynamic-network-architectures, or copies what
their private code does (trainer internals such as the logger's ``my_fantastic_logging``, the deep-supervision loss
weights, the predictor's manual initialisation, planning and preprocessing calls).

Pinned to nnunetv2 2.8.1: env, planning, the trainer, the network conventions and building blocks, and the predictor
live here, so an upgrade of nnU-Net changes this folder and nothing else. The one thing the rest of the package
relies on is the public layout of the U-Nets nnU-Net builds (``encoder``, ``decoder.stages``, ``decoder.transpconvs``,
``decoder.seg_layers``, the ``deep_supervision`` flag), which `networks/` and the architectural methods wrap and grow.
Tests and benchmarks may import nnunetv2 directly, to build reference objects.
"""
