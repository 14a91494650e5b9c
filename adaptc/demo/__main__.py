"""Entry point for ``python -m adaptc.demo``."""

from adaptc.demo.run import main

raise SystemExit(main())
