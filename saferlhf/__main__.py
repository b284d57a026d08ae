import sys

from saferlhf.cli import main

sys.exit(main())
