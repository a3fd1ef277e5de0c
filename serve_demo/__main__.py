import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned process (make bench) re-imports this module
    sys.exit(main())
