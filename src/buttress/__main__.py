import sys

from buttress.cli import main

sys.exit(main())
