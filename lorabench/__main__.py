import sys

from lorabench.commands.main import main

sys.exit(main())
