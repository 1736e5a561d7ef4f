import sys

from miniplm.cli import main

sys.exit(main())
