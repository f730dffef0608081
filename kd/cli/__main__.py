"""`python -m kd.cli`: the same as the `kd` command."""

from kd.cli.main import main

main()
