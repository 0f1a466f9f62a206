import sys

from prunevision_cli.main import main

sys.exit(main())
