import sys

from spotdiff.cli import main

sys.exit(main())
