import sys

from gpudeck.cli import main

sys.exit(main())
