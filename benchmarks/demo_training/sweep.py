"""Train one demo model with some preset fields overridden (the GPU runs tried a few at once).

    PYTHONPATH=src python benchmarks/demo_training/sweep.py NAME OUT MINUTES '{"lr": 2e-3}' [DEVICE [EVAL_EVERY]]

MINUTES 0 runs the preset's (or the overrides') `steps` instead of fitting them to a time.

The winning overrides were then written into `edgelmm.demo.train.PRESETS`, together with the
step count the run fitted to its minutes, so that `python -m edgelmm.demo.train --name NAME
--seed 0` repeats it.
"""

import dataclasses
import json
import sys
from pathlib import Path

from edgelmm.demo import train

name, out, minutes, overrides = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "cuda"
eval_every = int(sys.argv[6]) if len(sys.argv) > 6 else 0
preset = dataclasses.replace(train.PRESETS[name], **overrides)
train.run(name, preset, seed=0, out=out, device=device, eval_every=eval_every,
          minutes=minutes if minutes > 0 else None, steps=None if minutes > 0 else preset.steps)
