"""Command line: `python -m moetx demo|plan [...]` (also installed as `moetx`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch `moetx <command>`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("demo", "plan")
    if not argv or argv[0] not in commands:
        print(
            f"usage: moetx {{{','.join(commands)}}} [options]   (moetx <command> --help)",
            file=sys.stderr,
        )
        return 2
    if argv[0] == "demo":
        from moetx._demo import main as demo

        return demo(argv[1:])
    if argv[0] == "plan":
        from moetx._plan_cli import main as plan

        return plan(argv[1:])
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
