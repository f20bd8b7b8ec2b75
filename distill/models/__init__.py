"""Networks used as teachers, fake scores and generators (standalone files, see DESIGN.md s5).

Each model file is exported next to its weights under the library name ``distill_<file>`` (for
example ``generator/distill_mlp.py``). Importing this package registers those names as aliases of
the package modules, so ``Pipeline.from_pretrained`` resolves exported folders in a process that
imported distill, and plain diffusers resolves them through ``trust_remote_code=True`` elsewhere.
"""

import sys

from . import gmm, mlp
from .gmm import GaussianMixtureTeacher
from .mlp import MLPDenoiser

EXPORT_NAMES = {mlp: "distill_mlp", gmm: "distill_gmm"}
for _module, _name in EXPORT_NAMES.items():
    sys.modules.setdefault(_name, _module)

__all__ = ["GaussianMixtureTeacher", "MLPDenoiser", "EXPORT_NAMES"]
