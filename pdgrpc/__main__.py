import sys

from pdgrpc.cli import main

sys.exit(main())
