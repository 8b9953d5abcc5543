"""`python -m featcache ...` runs the command line (used by torchrun for distributed extraction)."""
from featcache_cli.main import main

main()
