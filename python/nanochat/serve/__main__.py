import sys

from nanochat.serve.cli import main

sys.exit(main())
