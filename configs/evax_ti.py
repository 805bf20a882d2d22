r"""EVA-X ViT-Ti/16: masked image modelling of a frozen teacher's features on CXRs.

  python -m cxrjax.main --config=configs/evax_ti.py --workdir=workdirs/evax_ti \
      --config.objective.teacher=workdirs/teacher_b

Arguments (after a colon): variant=Ti|S|B, runlocal (tiny CPU run, random teacher),
teacher=<workdir[:step]>. E.g. `--config=configs/evax_ti.py:variant=S,runlocal`.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  return config_blocks.evax_pretrain(arg, default_variant="Ti")
