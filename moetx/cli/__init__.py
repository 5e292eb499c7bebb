"""Layer 7, the command line: `moetx demo`, `moetx plan` and their shared arguments; nothing imports it."""
