"""The machinery no method owns: the loop (:mod:`.loop`), the trained networks (:mod:`.networks`), batches and
their random streams (:mod:`.batches`), and the run's state on disk (:mod:`.state`)."""

from .batches import load_teacher
from .loop import DistillationTrainer, make_accelerator
from .networks import build_network, compile_regions, frozen

__all__ = ["DistillationTrainer", "build_network", "compile_regions", "frozen", "load_teacher",
           "make_accelerator"]
