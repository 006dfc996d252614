"""What the ingest's decode tasks hand to its write tasks (pipelines/sink.py): the columns.

No Ray here, so that ``python -m pipelines.ingest --help`` answers without importing it.
"""

from __future__ import annotations

import pyarrow as pa

from common import schema

ROW_GROUP_ROWS = 1024  # ~12 MB row groups at 64x64: readers stream without loading whole files
# What decode tasks hand to write tasks: the image columns, the quarantine reason (null when the
# image is good) and each image's per-channel pixel sum and sum of squares, for the split's stats.
PX_SUM, PX_SUMSQ = "_px_sum", "_px_sumsq"
# ... and when the decode phase ran: each row carries its batch's start and end (Unix time) and
# the first row the batch's CPU seconds (0 the others), so that min, max and sum over any
# regrouping of rows give the phase's span and CPU.
DECODE_START, DECODE_END, DECODE_CPU = "_decode_start", "_decode_end", "_decode_cpu_s"
DECODED_SCHEMA = pa.schema(
    [*schema.IMAGES_SCHEMA, pa.field(schema.REASON, pa.string()),
     pa.field(PX_SUM, pa.list_(pa.int64(), 3)), pa.field(PX_SUMSQ, pa.list_(pa.int64(), 3)),
     pa.field(DECODE_START, pa.float64()), pa.field(DECODE_END, pa.float64()),
     pa.field(DECODE_CPU, pa.float64())]
)
