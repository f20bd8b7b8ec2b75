import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_unet():
    def make(sample_size=8, in_channels=1, num_class_embeds=None, seed=0):
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=num_class_embeds)
    return make
