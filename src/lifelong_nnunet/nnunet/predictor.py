"""Full sliding-window inference through nnU-Net's own predictor, initialised manually (no lookup by name)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from ..console import silenced_stdout


class Segmenter:
    """Segments raw images with a network and the plans it was trained with (preprocessing and resampling
    exactly as nnU-Net does it)."""

    def __init__(self, network: torch.nn.Module, plans: dict, configuration: str, dataset_json: dict,
                 device: torch.device, mirroring: bool = False, tile_step_size: float = 0.5) -> None:
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        with silenced_stdout():
            self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                                             perform_everything_on_device=device.type == "cuda", device=device,
                                             verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        network = network.to(device).eval()
        mirror_axes = tuple(range(len(cm.patch_size)))
        self.predictor.manual_initialization(network, pm, cm, [network.state_dict()], dataset_json,
                                             "nnUNetTrainer", mirror_axes)
        self.io = SimpleITKIO()

    def read(self, image_files: list[Path]) -> tuple[np.ndarray, dict]:
        return self.io.read_images([str(p) for p in image_files])

    def preprocess(self, image: np.ndarray, properties: dict) -> np.ndarray:
        """The image as the network sees it: nnU-Net's preprocessing of the configuration (crop, normalise,
        resample), exactly as its training data were preprocessed (`nnunet.trainer.read_preprocessed_image`)."""
        p = self.predictor
        preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
        with silenced_stdout():
            data, _, _ = preprocessor.run_case_npy(image, None, copy.deepcopy(properties), p.plans_manager,
                                                   p.configuration_manager, p.dataset_json)
        return data

    def predict_arrays(self, image: np.ndarray, properties: dict, probabilities: bool = False):
        """Label map in the input's voxel grid (z, y, x as SimpleITK reads it); optionally the class probabilities."""
        with torch.no_grad(), silenced_stdout():
            return self.predictor.predict_single_npy_array(image, properties, None, None, probabilities)

    def predict_files(self, image_files: list[Path]) -> tuple[np.ndarray, dict]:
        image, props = self.read(image_files)
        return self.predict_arrays(image, props), props

    def write(self, segmentation: np.ndarray, properties: dict, path: Path) -> None:
        self.io.write_seg(segmentation.astype(np.uint8), str(path), properties)


def read_label(path: Path) -> np.ndarray:
    seg, _ = SimpleITKIO().read_seg(str(path))
    return seg[0]
