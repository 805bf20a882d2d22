r"""EVA-X ViT-S/16: masked image modelling of a frozen teacher's features on CXRs.

  python -m cxrjax.main --config=configs/evax_s.py --workdir=workdirs/evax_s \
      --config.objective.teacher=workdirs/teacher_b

Arguments (after a colon): variant=Ti|S|B, runlocal (tiny CPU run, random teacher),
teacher=<workdir[:step]>. E.g. `--config=configs/evax_s.py:variant=S,runlocal`.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  return config_blocks.evax_pretrain(arg, default_variant="S")
