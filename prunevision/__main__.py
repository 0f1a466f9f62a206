import sys

from prunevision.cli import main

sys.exit(main())
