"""Networks used as teachers, fake scores and generators (standalone files).

Each model file is exported next to its weights under the library name ``distill_<file>`` (for
example ``generator/distill_mlp.py``). Importing this package registers those names as aliases of
the package modules, so ``Pipeline.from_pretrained`` resolves exported folders in a process that
imported distill, and plain diffusers resolves them through ``trust_remote_code=True`` elsewhere.
"""

import sys

from . import gmm, guided_transformer, guided_unet, mar, mlp, student_bank
from .gmm import GaussianMixtureTeacher
from .guided_transformer import GuidedTransformer2DModel
from .guided_unet import GuidedUNet2DModel
from .mar import MaskedAutoregressiveModel
from .mlp import MLPDenoiser
from .student_bank import StudentBank

EXPORT_NAMES = {mlp: "distill_mlp", gmm: "distill_gmm", guided_unet: "distill_guided_unet",
                guided_transformer: "distill_guided_transformer", student_bank: "distill_student_bank",
                mar: "distill_mar"}
for _module, _name in EXPORT_NAMES.items():
    sys.modules.setdefault(_name, _module)

__all__ = ["GaussianMixtureTeacher", "GuidedTransformer2DModel", "GuidedUNet2DModel",
           "MaskedAutoregressiveModel", "MLPDenoiser", "StudentBank", "EXPORT_NAMES"]
