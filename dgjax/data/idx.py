"""Reader for the IDX file format used by MNIST and Fashion-MNIST.

The format (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a header of
two zero bytes, one type-code byte, one byte giving the number of dimensions
``ndim``, then ``ndim`` big-endian uint32 sizes, then the data in row-major
(C) order, big-endian. The first four bytes read as a big-endian uint32 are
the file's "magic number": 2051 (``0x00000803``) for MNIST images (uint8, 3
dims) and 2049 (``0x00000801``) for labels (uint8, 1 dim).

Files may be gzip-compressed; compression is detected from the gzip magic
bytes ``1f 8b``, not from the file name.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

__all__ = ["DataError", "read_idx", "IDX_DTYPES", "IMAGES_MAGIC", "LABELS_MAGIC"]

#: IDX type code -> big-endian numpy dtype.
IDX_DTYPES = {
  0x08: np.dtype(">u1"),
  0x09: np.dtype(">i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}

#: Magic number of MNIST image files: uint8, 3 dimensions (n, rows, cols).
IMAGES_MAGIC = 0x00000803  # 2051
#: Magic number of MNIST label files: uint8, 1 dimension (n,).
LABELS_MAGIC = 0x00000801  # 2049

_GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
  """A data file or directory is missing, malformed or inconsistent.

  The message names the offending file or directory and states what was
  expected and what was found.
  """


def _describe_magic(magic: int) -> str:
  code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
  kind = IDX_DTYPES[code].name if code in IDX_DTYPES else f"unknown type 0x{code:02X}"
  return f"{magic} (0x{magic:08X}: {kind}, {ndim} dims)"


def _read_bytes(path: PathLike) -> tuple[bytes, bool]:
  """Returns the (decompressed) content of ``path`` and whether it was gzip."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  if not os.path.isfile(path):
    raise DataError(f"{path}: expected a file, found a directory or special file")
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read file ({e})") from e
  if raw[:2] == _GZIP_MAGIC:
    try:
      return gzip.decompress(raw), True
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(
        f"{path}: corrupt gzip data ({type(e).__name__}: {e}); "
        "the file is probably truncated or damaged, download it again"
      ) from e
  return raw, False


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
  """Reads an IDX file (raw or gzip-compressed) into a numpy array.

  Args:
    path: the file. Gzip compression is detected from the content.
    expected_magic: if given, the magic number the header must carry, e.g.
      :data:`IMAGES_MAGIC` (2051) or :data:`LABELS_MAGIC` (2049).

  Returns:
    An array with the shape from the header and the native-byte-order
    version of the header's dtype (``uint8`` for MNIST). The array owns its
    memory and is writable.

  Raises:
    DataError: file missing, corrupt gzip, bad header or magic number,
      or data shorter/longer than the header announces.
  """
  path = os.fspath(path)
  data, is_gzip = _read_bytes(path)
  gz_hint = ""
  if path.endswith(".gz") and not is_gzip:
    gz_hint = (
      "; note: the name ends in .gz but the content is not gzip "
      f"(starts with {data[:16]!r}) -- perhaps an HTML error page was saved"
    )

  if len(data) < 4:
    raise DataError(
      f"{path}: expected an IDX header of at least 4 bytes, found {len(data)} bytes{gz_hint}"
    )
  magic = int.from_bytes(data[:4], "big")
  code, ndim = data[2], data[3]
  if data[0] != 0 or data[1] != 0 or code not in IDX_DTYPES or ndim == 0:
    raise DataError(
      f"{path}: not an IDX file: bad magic number 0x{magic:08X} "
      "(expected two zero bytes, a type code in "
      f"{{{', '.join(f'0x{c:02X}' for c in IDX_DTYPES)}}} and ndim >= 1)"
      f"{gz_hint}"
    )
  if expected_magic is not None and magic != expected_magic:
    raise DataError(
      f"{path}: bad magic number: expected {_describe_magic(expected_magic)}, "
      f"found {_describe_magic(magic)}"
    )

  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise DataError(
      f"{path}: truncated header: expected {header_len} bytes for {ndim} "
      f"dimension sizes, found {len(data)} bytes"
    )
  shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
  dtype = IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  found = len(data) - header_len
  if found < expected:
    raise DataError(
      f"{path}: truncated file: header announces shape {shape} of "
      f"{dtype.name} ({expected} data bytes), found only {found} data bytes"
    )
  if found > expected:
    raise DataError(
      f"{path}: size mismatch: header announces shape {shape} of "
      f"{dtype.name} ({expected} data bytes), found {found} data bytes "
      f"({found - expected} trailing)"
    )
  array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
  # Copy into native byte order; this also makes the array writable.
  return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
