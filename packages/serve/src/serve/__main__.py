"""``python -m serve``: the LitServe OpenAI-compatible server lands with issue #5."""

import sys

if __name__ == "__main__":
    print("[serve] NOT YET IMPLEMENTED: the LitServe server lands with issue #5.", file=sys.stderr)
    sys.exit(2)
