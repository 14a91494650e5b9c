import sys

from adaptc.cli import main

sys.exit(main())
