"""Command line: `python -m moetx demo|plan|autoplan [...]` (also installed as `moetx`)."""

from __future__ import annotations

import sys

from moetx.cli import autoplan, demo, plan

COMMANDS = {"demo": demo.main, "plan": plan.main, "autoplan": autoplan.main}


def main(argv: list[str] | None = None) -> int:
    """Dispatch `moetx <command>`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = tuple(COMMANDS)
    if not argv or argv[0] not in commands:
        print(
            f"usage: moetx {{{','.join(commands)}}} [options]   (moetx <command> --help)",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
