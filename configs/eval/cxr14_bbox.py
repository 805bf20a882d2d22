r"""NIH ChestX-ray14 test split with Grad-CAM localisation on BBox_List_2017 boxes.

  python -m cxrjax.evaluate --config=configs/eval/cxr14_bbox.py:checkpoint=workdirs/ft_cxr14 \
      --workdir=workdirs/eval_cxr14

The 984 boxes of BBox_List_2017.csv (8 findings) are stored with the test images by the
nih_cxr14 builder; hit rates at IoU/IoBB T = 0.1 ... 0.7 as in Wang et al. 2017. Bootstrap
resampling is per image: the builder stores image ids, not patient ids.
"""

from cxrjax import evaluate
from cxrjax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, checkpoint="", split="test")
  config = evaluate.eval_config_base()
  config.checkpoint = args.checkpoint
  config.split = args.split
  config.threshold_split = "validation"
  config.localization.update(method="gradcam", num_examples=1000)
  config.data.batch_size = 256
  return config
