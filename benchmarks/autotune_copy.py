"""Auto-tune a saved index on probes drawn from its collection and save the tuned copy.

Usage::

    python benchmarks/autotune_copy.py /tmp/bench/index16 /tmp/bench/index16-auto

prints the autoconfig record (``himir_rag.autoconfig.auto_tune``) and writes the index with
the chosen scheduler parameters to the second folder, to be measured against the original
with ``himir bench run BENCH_DIR --index-dir COPY``.
"""

from __future__ import annotations

import json
import shutil
import sys

from himir_rag import HiMIRIndex
from himir_rag.autoconfig import apply_record, auto_tune


def main(source: str, target: str) -> None:
    index = HiMIRIndex.load(source)
    record = auto_tune(index)
    print(json.dumps(record, indent=1))
    apply_record(index, record)
    shutil.rmtree(target, ignore_errors=True)
    index.save(target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
