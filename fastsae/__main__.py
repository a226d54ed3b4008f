import sys

from fastsae.cli import main

sys.exit(main())
