"""Embeddings in lower precision, with sentence-transformers' rules (`quantize_embeddings`).

"int8" and "uint8" cut each dimension's range [min, max] into 256 equal buckets (uint8: bucket 0..255, int8: the
same minus 128); the ranges come from `ranges` (a (2, D) array of minima and maxima), else from
`calibration_embeddings`, else from the embeddings themselves. "binary" and "ubinary" keep one bit per dimension,
whether the value is above 0, packed eight to a byte (ubinary: uint8; binary: int8, the packed byte minus 128).
"""

import logging

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r} is not supported; use one of {', '.join(PRECISIONS)}.")
    return precision


def quantize_embeddings(embeddings, precision: str, ranges=None, calibration_embeddings=None):
    """`embeddings` (a float (N, D) or (D,) array, or a list of (n_i, D) matrices, which share one set of ranges)
    in `precision`, as numpy arrays."""
    check_precision(precision)
    if isinstance(embeddings, list):
        matrices = [np.asarray(e, dtype=np.float32) for e in embeddings]
        if precision.endswith("int8") and ranges is None and matrices:
            ranges = _ranges(
                np.concatenate(matrices) if calibration_embeddings is None else calibration_embeddings, precision
            )
        return [quantize_embeddings(m, precision, ranges) for m in matrices]
    embeddings = np.asarray(embeddings)
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise InputError(f"Embeddings to quantize must be float, got {embeddings.dtype}.")
    embeddings = embeddings.astype(np.float32)
    if precision == "float32":
        return embeddings
    if precision.endswith("binary"):
        packed = np.packbits(embeddings > 0, axis=-1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if ranges is None:
        ranges = _ranges(embeddings if calibration_embeddings is None else calibration_embeddings, precision)
    ranges = np.asarray(ranges, dtype=np.float32)
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)


def _ranges(calibration, precision):
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim == 1 or calibration.shape[0] == 1:
        raise InputError(
            f"Cannot compute {precision} ranges from a single embedding: encode several texts together, or pass "
            "ranges= or calibration_embeddings= from a representative set of embeddings."
        )
    if calibration.shape[0] < 100:
        logger.warning(
            "%s ranges computed from only %d embeddings; pass ranges= or calibration_embeddings= from more of them "
            "for stable buckets.",
            precision,
            calibration.shape[0],
        )
    return np.stack([calibration.min(axis=0), calibration.max(axis=0)])
