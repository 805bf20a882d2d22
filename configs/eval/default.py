r"""Evaluate a fine-tuned checkpoint on its test split (any task; data from the run).

  python -m cxrjax.evaluate --config=configs/eval/default.py:checkpoint=workdirs/ft_phantom \
      --workdir=workdirs/eval_ft_phantom

Arguments: checkpoint (fine-tuning workdir[:step]; default step: the one selected on
validation), split (default test), runlocal (few bootstrap resamples, small batches: tests
and laptops). Everything else: --config.<key>=<value>, see cxrjax/evaluate.py.
"""

from cxrjax import evaluate
from cxrjax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, checkpoint="", split="test", runlocal=False)
  config = evaluate.eval_config_base()
  config.checkpoint = args.checkpoint
  config.split = args.split
  if args.runlocal:
    config.data.batch_size = 8
    config.bootstrap.n_resamples = 200
    config.localization.num_examples = 8
    config.plots.num_overlays = 8
    config.dtype = "float32"
  return config
