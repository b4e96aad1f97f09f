"""``python -m infer.serve ...``: the same as ``python -m infer serve ...``."""

import sys

from infer.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
