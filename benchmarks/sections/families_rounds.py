"""(o) Progressive distillation and MSD on the exact toy:gaussians8 teacher in every noise family: the same
mixture as a VP, EDM or flow model (``teacher.noise``), each shipped toy config with that one override, 3
seeds, as section (n) does for SIM and Uni-Instruct. Goal: every family within 1.25x of the VP figure, 8/8
modes.
"""

from __future__ import annotations

from sections.families import family_rows

METHODS = (("progressive, 1 step", "configs/progressive_gaussians8.yaml", []),
           ("MSD, 4 students", "configs/msd_gaussians8.yaml", []))


def bench_families_rounds(quick: bool) -> str:
    return family_rows(METHODS, quick, [], "(o) Progressive and MSD in every noise family on toy:gaussians8")
