"""detectron2 config nodes of Mask2Former (``MODEL.MASK_FORMER`` and extra ``MODEL.SEM_SEG_HEAD`` keys).

Key names follow the public Mask2Former configs so recipes translate one to one, with one
difference: ``MODEL.MASK_FORMER.DEC_LAYERS`` counts the masked-attention layers (9 in the paper);
the prediction from the learned queries before the first layer is always supervised as well.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_mask2former_config"]


def add_mask2former_config(cfg: CN) -> None:
    """Add the Mask2Former keys to ``cfg`` (idempotent)."""
    if "MASK_FORMER" in cfg.MODEL:
        return
    head = cfg.MODEL.SEM_SEG_HEAD
    head.MASK_DIM = 256
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.TRANSFORMER_ENC_LAYERS = 6
    head.DEFORMABLE_NUM_HEADS = 8
    head.DEFORMABLE_NUM_POINTS = 4
    head.DEFORMABLE_DIM_FEEDFORWARD = 1024

    cfg.MODEL.MASK_FORMER = CN()
    node = cfg.MODEL.MASK_FORMER
    node.DEEP_SUPERVISION = True
    node.NO_OBJECT_WEIGHT = 0.1
    node.CLASS_WEIGHT = 2.0
    node.MASK_WEIGHT = 5.0
    node.DICE_WEIGHT = 5.0
    node.HIDDEN_DIM = 256
    node.NUM_OBJECT_QUERIES = 100
    node.NHEADS = 8
    node.DROPOUT = 0.0
    node.DIM_FEEDFORWARD = 2048
    node.DEC_LAYERS = 9
    node.ENFORCE_INPUT_PROJ = False
    node.SIZE_DIVISIBILITY = 32
    node.TRAIN_NUM_POINTS = 112 * 112
    node.OVERSAMPLE_RATIO = 3.0
    node.IMPORTANCE_SAMPLE_RATIO = 0.75
    # contiguous class indices that are "things" (panoptic/instance inference); the segmentation task
    # fills this from the datamodule's metadata when the YAML leaves it empty
    node.THING_CLASS_IDS = []

    node.TEST = CN()
    node.TEST.SEMANTIC_ON = True
    node.TEST.INSTANCE_ON = False
    node.TEST.PANOPTIC_ON = False
    node.TEST.OBJECT_MASK_THRESHOLD = 0.8
    node.TEST.OVERLAP_THRESHOLD = 0.8
    node.TEST.DETECTIONS_PER_IMAGE = 100
    # combine class and mask scores after resizing the masks to the output size (implied by panoptic /
    # instance inference); off: combine at the input size and resize the class scores (official default)
    node.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
