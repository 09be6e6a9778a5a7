"""Pictures for people: predictions drawn on images, focal modulation maps (paper Figs. 5-6)."""
from focalnet_pl.visualize.draw import (
    draw_detectron2_output,
    draw_top5,
    load_picture,
    overlay_heatmap,
    save_picture,
    tensor_to_picture,
)

__all__ = ["draw_detectron2_output", "draw_top5", "load_picture", "overlay_heatmap", "save_picture", "tensor_to_picture"]
