"""The demo's (experiments/demo.py) peak learning rate and warmup.

  python -m experiments.sweep --config=experiments/demo.py --space=experiments/sweeps/demo.py \
      --metric=bleu --trials=8 --sampler=tpe --study_dir=runs/sweep_demo
Trials are shortened (FIXED): 160 steps instead of 800, evaluated every 40 steps on 128 held-out
pairs (BLEU with the demo's beam 4), no periodic checkpoints: about 55 s a trial on 2 CPU
cores, so 8 trials take 7.5 minutes. Results: docs/sweeps.md.
"""

from experiments.sweep_space import Float, Int

SPACE = {
  "optim.learning_rate": Float(3e-4, 3e-2, log=True),
  "optim.warmup_steps": Int(0, 150),
}
GRID = {  # --sampler=grid
  "optim.learning_rate": [1e-3, 3e-3, 1e-2],
  "optim.warmup_steps": [0, 50, 150],
}
FIXED = {
  "train.total_steps": 160,
  "train.log_every": 20,
  "eval.every": 40,
  "eval.examples": 0,
  "data.eval_examples": 128,
  "checkpoint.every": 0,
}
