"""What the baselines' processor wrappers share: holding a stock transformers processor and a threshold."""

from __future__ import annotations

from typing import Optional

from ..processing_utils import ReferringSegmentationProcessorMixin


class StockProcessorWrapper(ReferringSegmentationProcessorMixin):
    """A stock processor (an `image_processor` and a `tokenizer`) behind refseg's processor contract.

    Args:
        processor: the stock processor, e.g. `CLIPSegProcessor` or `Sam3Processor`.
        threshold (`float`, *optional*): default mask threshold on the sigmoid, in (0, 1);
            `default_threshold` when `None`.
        default_threshold (`float`): the wrapper's own default.
    """

    stock_processor_name = "processor"  # named in the error for a processor of another kind

    def __init__(self, processor, *, threshold: Optional[float] = None, default_threshold: float = 0.5):
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ValueError(f"`processor` must be a {self.stock_processor_name} (image processor + tokenizer), "
                             f"got {type(processor).__name__}")
        self.processor = processor
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.threshold = default_threshold if threshold is None else float(threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}")
