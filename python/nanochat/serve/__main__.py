import sys

from nanochat.serve import main

sys.exit(main())
