"""The machinery no method owns: the launch (:mod:`.launch`), the loop (:mod:`.loop`), the trained networks
(:mod:`.networks`), batches and their random streams (:mod:`.batches`), and the run's state on disk
(:mod:`.state`)."""

from .batches import load_teacher
from .launch import make_accelerator
from .loop import DistillationTrainer
from .networks import Update, build_network, compile_regions, frozen

__all__ = ["DistillationTrainer", "Update", "build_network", "compile_regions", "frozen", "load_teacher",
           "make_accelerator"]
