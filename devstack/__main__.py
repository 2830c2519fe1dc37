"""`python -m devstack COMMAND [ARGS]`: the local tooling in one place.

    dev     the whole local stack (what `make dev` runs)        = python -m devstack.dev
    seed    seed the demo zone into a running API               = python -m devstack.seed
    token   mint a mandate with the local signing key           = python -m devstack.tokens
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__.split("\n", 2)[2]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: python -m devstack {dev,seed,token} [ARGS]\n\n" + USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "dev":
        from devstack import dev

        code = dev.main()
        sys.stdout.flush()
        os._exit(code)  # see devstack/dev.py
    if command == "seed":
        from devstack import seed

        return seed.main(rest)
    if command in ("token", "tokens"):
        from devstack import tokens

        return tokens.main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
