"""The `referring_iou` evaluate module (`referring_iou.py`, loadable with `evaluate.load(<this folder>)`)."""
