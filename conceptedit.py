#!/usr/bin/env python3
"""ConceptEdit command line: `python conceptedit.py --help` (or `bash run.sh cli --help`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402

if __name__ == "__main__":
    _pack.load()
    from conceptedit.cli import main
    sys.exit(main())
