import sys

from omniforge.cli import main

sys.exit(main())
