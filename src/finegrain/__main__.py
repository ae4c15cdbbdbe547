"""``python -m finegrain`` and the ``finegrain`` command: the wait policy first (before PyTorch starts), then the
command line (``finegrain.cli``)."""

# ruff: noqa: E402, I001 - the policy must be in the environment before anything imports PyTorch
import sys

from finegrain.cpu_load import choose_wait_policy

choose_wait_policy()

from finegrain.cli import main


def run() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(main())
