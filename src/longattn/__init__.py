"""longattn: fast, measured long-context attention behind one API.

``attention`` dispatches exact, masked, block-sparse, biased and packed-varlen attention to the fastest correct
backend; ``masks`` holds FlexAttention-style patterns; ``BlockSparse`` is the block description kernels consume.
"""

from longattn import masks, methods
from longattn.api import attention, sparse_attention
from longattn.hf.patch import patch
from longattn.kernels.decode import decode_attention
from longattn.kernels.linear import linear_attention, linear_attention_step
from longattn.masks.block_sparse import BlockSparse

__version__ = "0.1.0"
__all__ = ["BlockSparse", "attention", "decode_attention", "linear_attention", "linear_attention_step", "masks",
           "methods", "patch", "sparse_attention", "__version__"]
