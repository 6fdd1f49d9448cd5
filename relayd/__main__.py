"""`python -m relayd` is the same as the `relayd` command."""

from relayd.cli import main

raise SystemExit(main())
