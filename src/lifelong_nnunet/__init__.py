"""lifelong-nnunet: continual learning for 3D medical image segmentation on nnU-Net v2."""
