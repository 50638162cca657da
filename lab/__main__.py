"""`python -m lab cleanup [--prefix cyl]`: remove what a crashed lab run left behind."""

import argparse

from .topology import cleanup_stale


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup", help="delete stale <prefix>-* namespaces and <prefix>* links")
    c.add_argument("--prefix", default="cyl")
    a = ap.parse_args(argv)
    removed = cleanup_stale(a.prefix)
    print("removed: " + (" ".join(removed) if removed else "nothing"))


if __name__ == "__main__":
    main()
