#!/usr/bin/env python
"""Export a run's encoder for timm: tools/export_encoder.py RUN_DIR OUT.pt"""
import sys

from mto_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
