#!/usr/bin/env python
"""Export a run's encoder for timm: tools/export_encoder.py RUN_DIR OUT.pt (or OUT.safetensors)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mto_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
