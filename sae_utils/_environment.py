"""Import-time settings of the package's environment, in one place.

sae_utils runs without torchvision on purpose (on many machines it drags in a multi-GB CUDA build of
torch), so transformers' notice that it falls back to its PIL image processors is expected: it is filtered
from transformers' import logger, and only that notice.
"""
import logging


class _TorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
