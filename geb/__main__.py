"""`python -m geb ...` and `torchrun -m geb pretrain ...` enter the one CLI here."""

from geb.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
