"""Peak tensor memory of one training step on CPU: the bytes of every live tensor at the step's start plus the
largest rise during the step (allocations and frees recorded by torch.profiler) - the CPU analogue of
torch.cuda.max_memory_allocated."""
import gc
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from distill.config import load_config
from distill.trainers import trainer_class


def live_tensor_bytes():
    storages = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                st = o.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        except Exception:
            continue
    return sum(storages.values())

cfg = load_config(sys.argv[1], sys.argv[2:])
trainer = trainer_class(cfg.method)(cfg)
trainer.setup()
def step(s):
    trainer.rng = trainer.step_generator(s, 0)
    trainer.run_objective(trainer.objective(trainer._batch(), s))
step(0)  # optimizer state exists from here on
gc.collect()
start = live_tensor_bytes()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step(1)
cur = rise = 0
for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
    cur += e.self_cpu_memory_usage
    rise = max(rise, cur)
print(json.dumps({"start": start, "rise": rise, "peak": start + rise}))
