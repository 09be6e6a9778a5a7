"""``cfg.MODEL.DINO`` defaults: the official FocalNet-DINO / IDEA DINO 4-scale, 12-epoch COCO recipe
(``config/DINO/DINO_4scale.py``)."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_dino_config(cfg: CN) -> None:
    """Add the ``MODEL.DINO`` node to a detectron2 config (idempotent)."""
    if "DINO" in cfg.MODEL:
        return
    cfg.MODEL.DINO = CN()
    dino = cfg.MODEL.DINO
    dino.NUM_CLASSES = 80
    # backbone features fed to the transformer; levels beyond them are stride-2 convs on the last one
    dino.IN_FEATURES = ["res3", "res4", "res5"]
    dino.NUM_FEATURE_LEVELS = 4
    dino.NUM_QUERIES = 900
    dino.HIDDEN_DIM = 256
    dino.NHEADS = 8
    dino.ENC_LAYERS = 6
    dino.DEC_LAYERS = 6
    dino.DIM_FEEDFORWARD = 2048
    dino.DROPOUT = 0.0
    dino.ENC_N_POINTS = 4
    dino.DEC_N_POINTS = 4
    # sine position embedding (cumsum + PE_OFFSET) / extent: official DINO 20 / 0.0, detrex 10000 / -0.5
    dino.PE_TEMPERATURE = 20.0
    dino.PE_OFFSET = 0.0
    # mixed query selection: top-k encoder proposals as anchors, learnable content queries
    dino.TWO_STAGE = True
    # contrastive denoising
    dino.DN_NUMBER = 100
    dino.DN_LABEL_NOISE_RATIO = 0.5
    # official DINO / FocalNet-DINO configs: 0.4 (detrex: 1.0)
    dino.DN_BOX_NOISE_SCALE = 0.4
    # losses (weights) and Hungarian matching costs
    dino.CLASS_WEIGHT = 1.0
    dino.BBOX_WEIGHT = 5.0
    dino.GIOU_WEIGHT = 2.0
    dino.COST_CLASS = 2.0
    dino.COST_BBOX = 5.0
    dino.COST_GIOU = 2.0
    dino.FOCAL_ALPHA = 0.25
    dino.FOCAL_GAMMA = 2.0
    dino.AUX_LOSS = True
    # one class / box head shared by all decoder layers (official DINO); False: one per layer (detrex)
    dino.SHARE_DECODER_HEADS = True
    # inference: top-k over queries x classes
    dino.NUM_SELECT = 300
    # padded batch size multiple (0: pad only to the largest image of the batch, as the official DINO)
    dino.SIZE_DIVISIBILITY = 0
