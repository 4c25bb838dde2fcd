"""Run the real ``himir index`` command with a slow fake encoder, for the crash-safety tests.

Usage::

    python tests/crash_index_helper.py IMAGES INDEX [--encode-delay S] [--fsync-delay S] [--layout 1+M+N]
                                       [--wait S]

Everything is the CLI's own code (``himir_rag.cli.app``: open or resume the index, ``add``
with checkpoints, atomic ``save``); only the encoder is replaced by the test suite's
``ColorEncoder`` (spec ``test:color``), slowed down so a test can kill the process at a
chosen moment (the multi-process tests run several at once on one index). Events are printed on stdout, flushed, one per line, *before* the pause
that follows them, so a test that kills the process on reading an event knows where
the process stands:

- ``encode``: an encoder batch starts (then sleeps ``--encode-delay``)
- ``save-begin`` / ``save-end``: a checkpoint or the final save
- ``fsync NAME``: a file of the save was written and flushed (then sleeps ``--fsync-delay``);
  NAME is ``vectors.bin`` (the new rows appended), ``manifest.json`` (staging) or ``CURRENT`` (the pointer swap)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import himir_rag.index as index_module  # noqa: E402
from himir_rag.cli import app  # noqa: E402
from tests.conftest import ColorEncoder  # noqa: E402


def event(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("images")
    parser.add_argument("index")
    parser.add_argument("--encode-delay", type=float, default=0.0)
    parser.add_argument("--fsync-delay", type=float, default=0.0)
    parser.add_argument("--layout", default="1+2+4")
    parser.add_argument("--wait", help="passed on to himir index (seconds to wait for another writer)")
    args = parser.parse_args()

    class SlowColorEncoder(ColorEncoder):
        def embed_images(self, images):
            event("encode")
            time.sleep(args.encode_delay)
            return super().embed_images(images)

    def get_encoder(spec: str, *, device: str = "cpu"):
        assert spec == ColorEncoder.name, spec
        return SlowColorEncoder()

    real_fsync, real_save = index_module._fsync, index_module.HiMIRIndex.save

    def fsync(fh) -> None:
        real_fsync(fh)
        name = Path(fh.name).name
        event("fsync " + next((n for n in ("vectors.bin", "manifest.json", "CURRENT") if n in name), name))
        time.sleep(args.fsync_delay)

    def save(self, directory, **options):
        event("save-begin")
        version = real_save(self, directory, **options)
        event("save-end")
        return version

    index_module.get_encoder = get_encoder
    index_module._fsync = fsync
    index_module.HiMIRIndex.save = save
    # --checkpoint-every 16: a checkpoint after every 16 files (one chunk of add())
    app(["index", args.images, "--index", args.index, "--encoder", ColorEncoder.name, "--layout", args.layout,
         "--no-progress", "--batch-size", "8", "--checkpoint-every", "16",
         *([] if args.wait is None else ["--wait", args.wait])])


if __name__ == "__main__":
    main()
